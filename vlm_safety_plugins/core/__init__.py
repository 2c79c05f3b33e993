"""What every defense stands on: hook specs and the plugin manager, the config and its
options, the runtime (``attach``, ``GenerationCall``), the ``Defense`` base and its call
contract, reports, errors and the model adapters. Nothing here names a defense."""
