# A stub for `ml_collections` hides the package's own modules from pyright, so the flags used
# here are declared again with the package's own signatures (ml_collections 1.1).
from typing import Any

from absl import flags
from ml_collections.config_dict import ConfigDict

def DEFINE_config_file(
  name: str,
  default: str | None = None,
  help_string: str = "path to config file.",
  flag_values: flags.FlagValues = ...,
  lock_config: bool = True,
  accept_new_attributes: bool = False,
  sys_argv: list[str] | None = None,
  **kwargs: Any,
) -> flags.FlagHolder[Any]: ...
def DEFINE_config_dict(
  name: str,
  config: ConfigDict,
  help_string: str = "ConfigDict instance.",
  flag_values: flags.FlagValues = ...,
  lock_config: bool = True,
  accept_new_attributes: bool = False,
  sys_argv: list[str] | None = None,
  **kwargs: Any,
) -> flags.FlagHolder[Any]: ...
def get_config_filename(config_flag: Any) -> str: ...
def get_override_values(config_flag: Any) -> dict[str, Any]: ...
