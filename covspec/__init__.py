"""CoVSpec: device-edge co-inference for vision-language models via speculative decoding."""

__version__ = "0.1.0"
