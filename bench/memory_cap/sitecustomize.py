# Measuring aid: cap this process's CUDA caching allocator at MXLORA_CAP_BYTES (an H100 80GB's
# total memory on a bigger GPU), so an allocation past it fails as it would there. Under
# torchrun each process caps the GPU it trains on (LOCAL_RANK), not GPU 0.
import os

if os.environ.get("MXLORA_CAP_BYTES"):
    import torch

    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = int(os.environ["MXLORA_CAP_BYTES"]) / total
        torch.cuda.set_per_process_memory_fraction(fraction, device)
