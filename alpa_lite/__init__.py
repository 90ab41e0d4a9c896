"""alpa_lite: automatic intra- and inter-operator parallelization for JAX.

Importing this package touches no backend and reads no environment variable.
"""

from alpa_lite import checkpoint as checkpoint
from alpa_lite import distributed as distributed
from alpa_lite import testing as testing
from alpa_lite import timeline as timeline
from alpa_lite.api import ParallelizedFunction as ParallelizedFunction
from alpa_lite.api import parallelize as parallelize
from alpa_lite.cluster import ClusterSpec as ClusterSpec
from alpa_lite.config import AutoLayerOption as AutoLayerOption
from alpa_lite.config import AutoStageOption as AutoStageOption
from alpa_lite.config import DataParallel as DataParallel
from alpa_lite.config import ManualLayerOption as ManualLayerOption
from alpa_lite.config import ManualStageOption as ManualStageOption
from alpa_lite.config import PipeshardParallel as PipeshardParallel
from alpa_lite.config import ShardParallel as ShardParallel
from alpa_lite.config import Zero2Parallel as Zero2Parallel
from alpa_lite.config import UniformStageOption as UniformStageOption
from alpa_lite.config import Zero3Parallel as Zero3Parallel
from alpa_lite.errors import AlpaLiteError as AlpaLiteError
from alpa_lite.errors import InfeasiblePlanError as InfeasiblePlanError
from alpa_lite.errors import InvalidConfigError as InvalidConfigError
from alpa_lite.errors import UnsupportedPrimitiveError as UnsupportedPrimitiveError
from alpa_lite.markers import grad as grad
from alpa_lite.markers import mark_pipeline_boundary as mark_pipeline_boundary
from alpa_lite.markers import value_and_grad as value_and_grad
from alpa_lite.mesh import LogicalMesh as LogicalMesh
from alpa_lite.plan import ParallelPlan as ParallelPlan
from alpa_lite.profiling.database import ProfileDatabase as ProfileDatabase

__version__ = "0.1.0"
