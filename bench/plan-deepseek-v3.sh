#!/bin/bash
# bench/plan-deepseek-v3.sh - `moecal calibrate --plan` for the full
# DeepSeek-V3 (61 layers, 58 of them MoE, 256 FP8 experts each) on 1, 2, 4,
# 8 and 16 nodes of 8 GPUs, 1 M calibration tokens: the README's table.
# Nothing is read but the config.json this script writes (DeepSeek-V3's own
# values); the GPU memory is the CUDA backend's own sizing, so run it with a
# moecal built --with-cuda (no GPU needed).
#   bench/plan-deepseek-v3.sh [MOECAL] [READ_GBPS] [TOKENS_PER_S]
set -eu
moecal=${1:-moecal}
gbps=${2:-10}
rate=${3:-1000000}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/config.json" <<'JSON'
{
  "architectures": ["DeepseekV3ForCausalLM"],
  "model_type": "deepseek_v3",
  "hidden_act": "silu",
  "hidden_size": 7168,
  "intermediate_size": 18432,
  "moe_intermediate_size": 2048,
  "num_hidden_layers": 61,
  "first_k_dense_replace": 3,
  "moe_layer_freq": 1,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "num_experts_per_tok": 8,
  "n_group": 8,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "scoring_func": "sigmoid",
  "norm_topk_prob": true,
  "routed_scaling_factor": 2.5,
  "num_attention_heads": 128,
  "num_key_value_heads": 128,
  "vocab_size": 129280,
  "torch_dtype": "bfloat16",
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                          "quant_method": "fp8", "weight_block_size": [128, 128]}
}
JSON
printf '| nodes x GPUs | weights read/node | tokens read/leader | exchange/leader | host/node '
printf '| GPU/rank | read s | compute s | predicted wall |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for n in 1 2 4 8 16; do
    "$moecal" calibrate --quiet --plan --backend cuda -m "$dir" --max-tokens 1M \
        --chunk-tokens 131072 --plan-nodes "$n" --plan-ranks-per-node 8 \
        --assume-read-gbps "$gbps" --assume-tokens-per-s "$rate" >"$dir/plan.txt"
    awk -v n="$n" '
        $1 == "0" && NF == 11 { read = $3; tok = $4; ex = $5; host = $6; gpu = $8;
                                rs = $9; cs = $10 }
        /predicted wall/ { wall = $4; why = $6; sub(/,$/, "", why) }
        END { printf "| %d x 8 | %.0f GB | %.1f GB | %.1f GB | %.1f GiB | %.1f GiB | %s | %s | %s s %s |\n",
              n, read - tok, tok, ex, host, gpu, rs, cs, wall, why }' "$dir/plan.txt"
done
echo
echo "Assumed: $gbps GB/s read per node, $rate tokens/s per GPU for a whole layer; chunks of 131072."
