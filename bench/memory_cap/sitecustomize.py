# Measuring aid: cap this process's CUDA caching allocator at MXLORA_CAP_BYTES (an H100 80GB's
# total memory on a bigger GPU), so an allocation past it fails as it would there.
import os

if os.environ.get("MXLORA_CAP_BYTES"):
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(int(os.environ["MXLORA_CAP_BYTES"]) / total)
