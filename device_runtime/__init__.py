"""covspec.device_runtime: the device side (draft VLM, pruner) speaking the CoVSpec protocol."""
