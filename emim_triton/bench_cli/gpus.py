"""The GPUs the static cost model (`emim-bench static`) can predict for: datasheet rates and SM limits.

Datasheet numbers (dense, no sparsity), not measurements: they set the model's three floors (instruction
issue, tensor-core work, HBM traffic) and the occupancy limits. The rates are those of the SXM parts at
their boost clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    key: str  # --gpu value
    name: str
    device_name: str  # torch.cuda.get_device_name(), to find the shipped tuning entries (tuning_cache.DeviceId)
    arch: int  # compute capability compiled for: 80 -> sm_80, 90 -> sm_90a
    sms: int
    schedulers_per_sm: int  # warp schedulers, each issuing one warp-instruction per cycle
    clock_hz: float  # boost clock
    tensor_flops: dict  # operand type of the MMA ("tf32", "bf16", "fp16", "fp8", "int8") -> dense FLOP/s (ops/s)
    hbm_bytes_per_s: float
    shared_per_sm: int  # bytes of shared memory an SM can give its resident CTAs
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    reserved_shared_per_cta: int = 1024  # shared memory the driver keeps per CTA (sm_80 and later)

    @property
    def issue_rate(self) -> float:
        """Warp-instructions per second the whole GPU can issue."""
        return self.sms * self.schedulers_per_sm * self.clock_hz

    def as_dict(self) -> dict:
        return {**vars(self), "tensor_flops": dict(self.tensor_flops)}


_HOPPER_TENSOR = {"tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "int8": 1978.9e12}

GPUS = {
    gpu.key: gpu for gpu in (
        GPU("h200", "NVIDIA H200 SXM", "NVIDIA H200", 90, sms=132, schedulers_per_sm=4, clock_hz=1.98e9,
            tensor_flops=_HOPPER_TENSOR, hbm_bytes_per_s=4.8e12, shared_per_sm=228 * 1024),
        GPU("h100", "NVIDIA H100 SXM", "NVIDIA H100 80GB HBM3", 90, sms=132, schedulers_per_sm=4, clock_hz=1.98e9,
            tensor_flops=_HOPPER_TENSOR, hbm_bytes_per_s=3.35e12, shared_per_sm=228 * 1024),
        GPU("a100", "NVIDIA A100 SXM 80GB", "NVIDIA A100-SXM4-80GB", 80, sms=108, schedulers_per_sm=4,
            clock_hz=1.41e9, tensor_flops={"tf32": 156e12, "bf16": 312e12, "fp16": 312e12, "int8": 624e12},
            hbm_bytes_per_s=2.039e12, shared_per_sm=164 * 1024),
    )
}
