"""alpa_lite: automatic intra- and inter-operator parallelization for JAX.

Importing this package touches no backend and reads no environment variable.
"""

from alpa_lite.errors import AlpaLiteError as AlpaLiteError
from alpa_lite.errors import InfeasiblePlanError as InfeasiblePlanError
from alpa_lite.errors import InvalidConfigError as InvalidConfigError
from alpa_lite.errors import UnsupportedPrimitiveError as UnsupportedPrimitiveError
from alpa_lite.markers import grad as grad
from alpa_lite.markers import mark_pipeline_boundary as mark_pipeline_boundary
from alpa_lite.markers import value_and_grad as value_and_grad
from alpa_lite.mesh import LogicalMesh as LogicalMesh

__version__ = "0.1.0"
