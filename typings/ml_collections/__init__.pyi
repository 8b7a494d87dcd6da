# Local stub (pyright reads `typings/`): the package ships no annotations, so pyright infers
# `ConfigDict.__getattr__` as the union of every value type it has ever seen (str | int | ... |
# None) and flags each `config.x.y`. A ConfigDict is a dynamic attribute bag: its fields are `Any`.
from ml_collections.config_dict import ConfigDict as ConfigDict
from ml_collections.config_dict import FieldReference as FieldReference
from ml_collections.config_dict import FrozenConfigDict as FrozenConfigDict

__version__: str
