"""Built-in tables for the TP/DP calculator: model shapes and GPU figures.

Both tables exist so that `fastgrpo tp-dp` works offline. Every model row is
copied from that model's `config.json` on the Hugging Face Hub; every GPU row
from the vendor's datasheet (memory as `nvidia-smi` / `torch.cuda` reports it,
which is a little under the marketing figure). Add a row here, or pass a local
model folder / custom GPU figures on the command line.
"""

# ----------------------------------------------------------------------------
# Model architectures. Keys are the names users type; the Hub org is optional
# (`Qwen/Qwen2.5-7B` and `Qwen2.5-7B` both work, case-insensitive, and an
# `-Instruct` suffix maps to the base row: same shapes).
#
# Columns are the config.json fields with the same names:
#   layers = num_hidden_layers, hidden = hidden_size, heads = num_attention_heads,
#   kv_heads = num_key_value_heads, head_dim = head_dim (or hidden/heads when the
#   config has none), intermediate = intermediate_size, vocab = vocab_size,
#   tied = tie_word_embeddings, qkv_bias = the architecture adds a bias to the
#   q/k/v projections (Qwen2 does, Qwen3 and Llama do not), qk_norm = per-head
#   RMSNorm on q and k (Qwen3).
# ----------------------------------------------------------------------------

_QWEN2 = dict(qkv_bias=True, qk_norm=False)
_QWEN3 = dict(qkv_bias=False, qk_norm=True)
_LLAMA = dict(qkv_bias=False, qk_norm=False)

KNOWN_MODELS = {
    # Qwen2.5 (Qwen/Qwen2.5-*/config.json; the -Instruct configs have the same shapes).
    "Qwen/Qwen2.5-0.5B": dict(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936, tied=True, **_QWEN2),
    "Qwen/Qwen2.5-1.5B": dict(layers=28, hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936, tied=True, **_QWEN2),
    "Qwen/Qwen2.5-3B": dict(layers=36, hidden=2048, heads=16, kv_heads=2, head_dim=128, intermediate=11008, vocab=151936, tied=True, **_QWEN2),
    "Qwen/Qwen2.5-7B": dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064, tied=False, **_QWEN2),
    "Qwen/Qwen2.5-14B": dict(layers=48, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=13824, vocab=152064, tied=False, **_QWEN2),
    "Qwen/Qwen2.5-32B": dict(layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=27648, vocab=152064, tied=False, **_QWEN2),
    "Qwen/Qwen2.5-72B": dict(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=29568, vocab=152064, tied=False, **_QWEN2),
    # Qwen3 dense models (Qwen/Qwen3-*/config.json; head_dim is explicit there).
    "Qwen/Qwen3-0.6B": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936, tied=True, **_QWEN3),
    "Qwen/Qwen3-1.7B": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab=151936, tied=True, **_QWEN3),
    "Qwen/Qwen3-4B": dict(layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151936, tied=True, **_QWEN3),
    "Qwen/Qwen3-8B": dict(layers=36, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151936, tied=False, **_QWEN3),
    "Qwen/Qwen3-14B": dict(layers=40, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=17408, vocab=151936, tied=False, **_QWEN3),
    "Qwen/Qwen3-32B": dict(layers=64, hidden=5120, heads=64, kv_heads=8, head_dim=128, intermediate=25600, vocab=151936, tied=False, **_QWEN3),
    # Llama 3.x (meta-llama/*/config.json).
    "meta-llama/Llama-3.2-1B": dict(layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256, tied=True, **_LLAMA),
    "meta-llama/Llama-3.2-3B": dict(layers=28, hidden=3072, heads=24, kv_heads=8, head_dim=128, intermediate=8192, vocab=128256, tied=True, **_LLAMA),
    "meta-llama/Llama-3.1-8B": dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256, tied=False, **_LLAMA),
    "meta-llama/Llama-3.1-70B": dict(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256, tied=False, **_LLAMA),
    # 405B: 756 GiB of bf16 weights, more than one node of 8 x 80 GB holds (docs/tp-dp.md, "Several nodes").
    "meta-llama/Llama-3.1-405B": dict(layers=126, hidden=16384, heads=128, kv_heads=8, head_dim=128, intermediate=53248, vocab=128256, tied=False, **_LLAMA),
    # SmolLM2 (HuggingFaceTB/*/config.json): Llama architecture. 135M is fastgrpo's demo model.
    "HuggingFaceTB/SmolLM2-135M": dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152, tied=True, **_LLAMA),
    "HuggingFaceTB/SmolLM2-360M": dict(layers=32, hidden=960, heads=15, kv_heads=5, head_dim=64, intermediate=2560, vocab=49152, tied=True, **_LLAMA),
    "HuggingFaceTB/SmolLM2-1.7B": dict(layers=24, hidden=2048, heads=32, kv_heads=32, head_dim=64, intermediate=8192, vocab=49152, tied=True, **_LLAMA),
}

# Other spellings users type for the same shapes.
MODEL_ALIASES = {
    "meta-llama/Llama-3.1-8B": ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3.1-8B"],
    "meta-llama/Llama-3.1-70B": ["meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Llama-3.3-70B"],
}

# ----------------------------------------------------------------------------
# GPUs. memory_gib: what the driver reports as total (nvidia-smi / torch), the
# figure gpu_memory_utilization multiplies. bandwidth_gbs: peak memory bandwidth,
# GB/s. bf16_tflops: dense bf16 tensor-core peak (datasheets often print the
# 2:4-sparse figure, twice this; we use the dense one). interconnect_gbs: GPU to
# GPU bandwidth per direction, GB/s (NVLink total / 2; PCIe x16 where a card
# has no NVLink). allreduce_latency_us: the effective fixed cost of one small
# all-reduce between two devices inside a decode step, launch and the wait for
# the slower rank included; the model multiplies it by log2(TP). nccl-tests
# put a bare small all-reduce at ~10 us over NVLink; we use 20 us for NVLink
# parts (calibrated, see docs/tp-dp.md) and more where traffic crosses PCIe or
# the host.
# ----------------------------------------------------------------------------

KNOWN_GPUS = {
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOPS bf16 dense, NVLink 4 900 GB/s.
    "H100-80GB": dict(memory_gib=79.2, bandwidth_gbs=3350, bf16_tflops=989, interconnect_gbs=450, allreduce_latency_us=20),
    # H100 PCIe datasheet: 80 GB HBM2e, 2.0 TB/s, 756 TFLOPS bf16 dense, PCIe Gen5 x16 128 GB/s.
    "H100-PCIe": dict(memory_gib=79.2, bandwidth_gbs=2000, bf16_tflops=756, interconnect_gbs=64, allreduce_latency_us=50),
    # NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS bf16 dense, NVLink 900 GB/s.
    "H200": dict(memory_gib=139.8, bandwidth_gbs=4800, bf16_tflops=989, interconnect_gbs=450, allreduce_latency_us=20),
    # NVIDIA DGX B200 datasheet / 8: 180 GB HBM3e, 8 TB/s, 2.25 PFLOPS bf16 dense, NVLink 5 1.8 TB/s.
    "B200": dict(memory_gib=178.4, bandwidth_gbs=8000, bf16_tflops=2250, interconnect_gbs=900, allreduce_latency_us=20),
    # NVIDIA A100 SXM datasheet: 80 GB HBM2e, 2.039 TB/s, 312 TFLOPS bf16 dense, NVLink 3 600 GB/s.
    "A100-80GB": dict(memory_gib=79.2, bandwidth_gbs=2039, bf16_tflops=312, interconnect_gbs=300, allreduce_latency_us=20),
    # Same datasheet, 40 GB HBM2: 1.555 TB/s.
    "A100-40GB": dict(memory_gib=39.4, bandwidth_gbs=1555, bf16_tflops=312, interconnect_gbs=300, allreduce_latency_us=20),
    # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, 362 TFLOPS bf16 dense, PCIe Gen4 x16 64 GB/s, no NVLink.
    "L40S": dict(memory_gib=44.5, bandwidth_gbs=864, bf16_tflops=362, interconnect_gbs=32, allreduce_latency_us=50),
    # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, 121 TFLOPS bf16 dense, PCIe Gen4.
    "L4": dict(memory_gib=22.0, bandwidth_gbs=300, bf16_tflops=121, interconnect_gbs=32, allreduce_latency_us=50),
    # AWS A10G (g5): 24 GB GDDR6, 600 GB/s as the NVIDIA A10 datasheet; bf16 taken
    # as the A10's 125 TFLOPS dense (AWS publishes no figure; an upper bound). PCIe Gen4.
    "A10G": dict(memory_gib=22.0, bandwidth_gbs=600, bf16_tflops=125, interconnect_gbs=32, allreduce_latency_us=50),
    # GeForce RTX 4090 (Ada whitepaper): 24 GB GDDR6X, 1008 GB/s, 165 TFLOPS bf16
    # (fp32 accumulate), PCIe Gen4; no peer-to-peer, so all-reduce goes through the host.
    "RTX-4090": dict(memory_gib=23.6, bandwidth_gbs=1008, bf16_tflops=165, interconnect_gbs=25, allreduce_latency_us=80),
    # One core of fastgrpo's CPU reference machine (2 cores, 23 GiB, vLLM's CPU
    # build), so that `--num_server_gpus` counts cores. Measured there, not from
    # a datasheet (docs/tp-dp.md, "Measuring"): bf16 matmul ~870 GFLOP/s and a
    # memory copy ~76 GB/s with both cores busy, split evenly per core (so a
    # replica of k cores gets k times these); memory = host RAM / 2 cores.
    # These are achieved figures, yet the model still applies its efficiency
    # factors (0.8, 0.6) to them. Cores exchange all-reduce data through shared
    # memory: link = the copy figure, latency a guess (not measured). The KV
    # cache is not what is left of the memory but a fixed size:
    # VLLM_CPU_KVCACHE_SPACE, fastgrpo's default 1 GiB (--kv_cache_space).
    "CPU": dict(memory_gib=11.5, bandwidth_gbs=38, bf16_tflops=0.435, interconnect_gbs=38, allreduce_latency_us=50,
                kv_cache_gib=1.0),
}

GPU_ALIASES = {
    "H100-80GB": ["H100", "H100-SXM", "H100-SXM5", "H100-80G", "H100-SXM-80GB"],
    "H100-PCIe": ["H100-PCIE-80GB"],
    "H200": ["H200-141GB", "H200-SXM"],
    "A100-80GB": ["A100", "A100-SXM-80GB", "A100-80G"],
    "A100-40GB": ["A100-SXM-40GB", "A100-40G"],
    "L40S": ["L40S-48GB"],
    "L4": ["L4-24GB"],
    "A10G": ["A10", "A10G-24GB"],
    "RTX-4090": ["4090", "RTX4090", "GEFORCE-RTX-4090"],
    "B200": ["B200-180GB"],
    "CPU": ["CPU-core", "CPU-2core"],
}
