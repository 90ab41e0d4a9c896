"""The pipeline model shared by planning and running: how a train step splits around its
gradient boundary (`grad_split`), into per-stage programs (`partition`), and in which order
stages run micro-batches (`schedules`). `inter_op/` prices it; `emit/` runs it; it imports
neither."""
