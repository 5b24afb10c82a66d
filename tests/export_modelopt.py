#!/usr/bin/env python3
"""export_modelopt.py - `moecal export` against NVIDIA Model-Optimizer's own
NVFP4 quantization (the nvidia-modelopt package, NVFP4QTensor, on the CPU).

  export_modelopt.py SRC_DIR AMAX.h5 DST_DIR

For every routed expert projection: the source weight in bf16 (FP8 codes
times their block scale, rounded to bf16, as moecal and the calibration
dequantize it), weight_scale_2 = amax * fl32(1/2688) computed as PyTorch
computes `amax / 2688` on CUDA (a product with the rounded reciprocal; the
CPU divides, which differs in the last bit for some amax: counted and
printed), then NVFP4QTensor.quantize(weight, 16, weights_scaling_factor_2=
s2).  Its packed weight and E4M3 block scales must equal DST_DIR's bytes.

With a fourth argument, the quant summary `moecal calibrate` wrote beside
AMAX.h5 must equal, byte for byte, Model-Optimizer's print_quant_summary
lines for TensorQuantizers calibrated to the same amax (NVFP4 config).

Exit status 0 pass, 1 fail, 77 when torch or modelopt is missing.
"""
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import numpy as np
    import h5py
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    import modelopt
except ImportError as exc:
    print(f"export_modelopt: SKIP: {exc}", file=sys.stderr)
    sys.exit(77)
import reference as ref  # noqa: E402
import export_ref  # noqa: E402


def fail(msg):
    print(f"export_modelopt: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check_summary(path, fam, layers, amax_path):
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    on = QuantizerAttributeConfig(num_bits=(2, 1), axis=None, enable=True,
                                  block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    q, off = TensorQuantizer(on), TensorQuantizer(QuantizerAttributeConfig(enable=False))
    with h5py.File(amax_path, "r") as f:
        iam, wam = f["input_amax"][...], f["weight_amax"][...]
    order = (0, 1, 2) if fam.model_type == "mixtral" else (0, 2, 1)
    lines = []
    for li, L in enumerate(layers):
        for e in range(fam.E):
            for p in order:
                mod = fam.expert_name(L, e, p)[: -len(".weight")]
                q.amax = torch.tensor(float(iam[li, e, p]), dtype=torch.bfloat16)
                lines.append(f"{mod + '.input_quantizer':80} {q}")
                lines.append(f"{mod + '.output_quantizer':80} {off}")
                q.amax = torch.tensor(float(wam[li, e, p]), dtype=torch.bfloat16)
                lines.append(f"{mod + '.weight_quantizer':80} {q}")
    lines.append(f"{len(lines)} TensorQuantizers found in model")
    want = "\n".join(lines) + "\n"
    with open(path, encoding="utf-8") as f:
        got = f.read()
    if got != want:
        for i, (a, b) in enumerate(zip(got.splitlines(), want.splitlines())):
            if a != b:
                fail(f"{path} line {i + 1}:\n  moecal:         {a}\n  Model-Optimizer: {b}")
        fail(f"{path}: {len(got.splitlines())} lines, Model-Optimizer {len(lines)}")
    print(f"export_modelopt: {path}: {len(lines)} lines equal to Model-Optimizer's "
          "print_quant_summary")


def main():
    src, amax_path, dst = sys.argv[1:4]
    ck = ref.Checkpoint(src)
    fam = ref.Family(ck.cfg)
    with h5py.File(amax_path, "r") as f:
        layers = [int(x) for x in f["layers"][...]]
        wam = f["weight_amax"][...]
    out = {}
    for fn in sorted(os.listdir(dst)):
        if fn.endswith(".safetensors"):
            st = ref.SafeTensors(os.path.join(dst, fn))
            for k in st.header:
                out[k] = st
    inv = torch.tensor(export_ref.INV2688, dtype=torch.float32)
    n = ndiv = 0
    for li, L in enumerate(layers):
        for e in range(fam.E):
            for p in range(3):
                name = fam.expert_name(L, e, p)
                mod = name[: -len(".weight")]
                w = torch.from_numpy(ck.weight_bf16(name)).to(torch.bfloat16)
                wa = wam[li, e, p] if p == 1 else max(wam[li, e, 0], wam[li, e, 2])
                amax = torch.tensor(float(wa), dtype=torch.float32)
                s2 = amax * inv                      # CUDA's tensor / 2688
                ndiv += bool((amax / 2688.0) != s2)  # what the CPU would give
                qt, scale, s2o = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=s2)
                packed = qt._quantized_data.numpy().tobytes()
                sbytes = scale.view(torch.uint8).numpy().tobytes()
                st = out.get(mod + ".weight")
                if st is None:
                    fail(f"{mod}.weight missing from {dst}")
                if export_ref.raw_bytes(st, mod + ".weight") != packed:
                    fail(f"{mod}.weight: packed FP4 differs from Model-Optimizer's")
                if export_ref.raw_bytes(out[mod + ".weight_scale"], mod + ".weight_scale") != \
                        sbytes:
                    fail(f"{mod}.weight_scale: differs from Model-Optimizer's")
                if export_ref.raw_bytes(out[mod + ".weight_scale_2"], mod + ".weight_scale_2") \
                        != s2o.numpy().astype("<f4").tobytes():
                    fail(f"{mod}.weight_scale_2 differs")
                n += 1
    if len(sys.argv) > 4:
        check_summary(sys.argv[4], fam, layers, amax_path)
    print(f"export_modelopt: {dst}: {n} expert projections byte-identical to "
          f"nvidia-modelopt {modelopt.__version__} NVFP4QTensor.quantize (torch "
          f"{torch.__version__}); weight_scale_2 as CUDA computes it (amax x fl32(1/2688)): "
          f"{ndiv} of {n} would differ in the last bit with the CPU's division")


if __name__ == "__main__":
    main()
