#!/usr/bin/env python3
"""router_hf.py - moecal's expert selection against the models' own routers,
on tiny random Qwen3-MoE, Mixtral and DeepSeek-V3 models made by Hugging Face
transformers.

  router_hf.py build FAMILY MODEL_DIR TEXT_FILE
      a tiny randomly initialised model of FAMILY (qwen3_moe, mixtral,
      deepseek_v3) saved as bf16 safetensors, a word-level tokenizer, and
      random calibration text (capture_hf.py's)
  router_hf.py reference FAMILY MODEL_DIR ACT.h5 REF.npz --text FILE
                 --seq-len N --batch-size N --max-tokens N [--capture SCRIPT]
      runs the model over the tokens moecal-capture read, with hooks on every
      MoE block: the experts each token was sent to by the model's own router
      (and, for the softmax routers, the choice with ties at the k-th place
      given to the lower expert index, which is torch.topk's order on a GPU
      but not on the CPU), max |x| and max |h| per expert under that choice,
      and the weight amax; checks that ACT.h5 holds exactly the MoE inputs
  router_hf.py check OUT.h5 REF.npz [--min-agree F] [--report-only]
      OUT.h5 from `moecal calibrate --chunk-tokens 1` (so tokens_per_expert
      holds every token's experts): the fraction of token-expert assignments
      equal to the model's (lower index on ties) must be >= F (default
      0.9999); every token where moecal and the model's CPU tie order differ
      must be an exact tie; token counts, w1/w3 input amax and weight amax
      exact, w2 input amax within 1e-2.  --report-only prints the agreement
      and checks nothing (other --router-logits settings).

Exit status 0 pass, 1 fail, 77 when torch/transformers are missing.
"""
import argparse
import json
import os
import sys

try:
    import numpy as np
    import h5py
except ImportError:
    sys.exit(77)

sys.dont_write_bytecode = True   # never write into the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import capture_hf  # noqa: E402  (its tokenizer, text and capture loader)

RTOL_W2 = 1e-2
FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


def fail(msg):
    print(f"router_hf: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def need_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"router_hf: SKIP: {exc}", file=sys.stderr)
        sys.exit(77)


COMMON = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_model(family):
    """A tiny random model of the family, in float32 (cast later)."""
    import torch
    torch.manual_seed(11)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        # 64 experts, 8 per token, as the released Qwen3-MoE models route
        cfg = Qwen3MoeConfig(**COMMON, head_dim=64, intermediate_size=512,
                             moe_intermediate_size=96, num_experts=64, num_experts_per_tok=8,
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0])
        return Qwen3MoeForCausalLM(cfg)
    if family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        cfg = MixtralConfig(**COMMON, head_dim=64, intermediate_size=128, num_local_experts=8,
                            num_experts_per_tok=2)
        return MixtralForCausalLM(cfg)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    cfg = DeepseekV3Config(**dict(capture_hf.CONFIG, n_routed_experts=32, num_experts_per_tok=4))
    cfg.topk_method = "noaux_tc"
    cfg.scoring_func = "sigmoid"
    if hasattr(cfg, "num_mtp_layers"):
        cfg.num_mtp_layers = 0
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.weight.normal_(0.0, 0.08)
            layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.05)
    return model


def cmd_build(args):
    need_torch()
    import torch
    import transformers
    model = make_model(args.family).to(torch.bfloat16)
    os.makedirs(args.model_dir, exist_ok=True)
    model.save_pretrained(args.model_dir, safe_serialization=True)
    cfg = model.config
    if args.family == "deepseek_v3":
        capture_hf.per_expert_checkpoint(args.model_dir, cfg.n_routed_experts,
                                         cfg.moe_intermediate_size)
    capture_hf.write_tokenizer_and_text(args.model_dir, args.text, cfg.vocab_size)
    with open(os.path.join(args.model_dir, "config.json"), encoding="utf-8") as fp:
        keys = sorted(k for k in json.load(fp) if "expert" in k)
    print(f"router_hf: built {args.family} in {args.model_dir} (torch {torch.__version__}, "
          f"transformers {transformers.__version__}); expert keys in config.json: {keys}")
    return 0


def stable_topk(probs, k):
    """Top-k with exact ties given to the lower index (a stable sort)."""
    import torch
    return torch.sort(probs, dim=-1, descending=True, stable=True)[1][:, :k]


def cmd_reference(args):
    need_torch()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cap = capture_hf.load_capture(args.capture)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    docs = cap.read_documents(argparse.Namespace(text=args.text, jsonl=None, field="text"))
    seqs = cap.token_sequences(tok, docs, args.seq_len, args.max_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
    cfg = model.config
    softmax = args.family != "deepseek_v3"
    blocks = [(i, layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe)
              for i, layer in enumerate(model.model.layers)]
    blocks = [(i, b) for i, b in blocks if hasattr(b, "gate") and hasattr(b, "experts")]
    layers = [i for i, _ in blocks]
    Lm = len(blocks)
    E = blocks[0][1].experts.num_experts
    k = cfg.num_experts_per_tok
    sel_model, sel_cpu, inputs = ({L: [] for L in layers} for _ in range(3))
    ties = np.zeros(Lm, np.int64)
    current = {}
    count = np.zeros((Lm, E), np.int64)
    amax_x = np.zeros((Lm, E), np.float32)
    amax_h = np.zeros((Lm, E), np.float32)
    wamax = np.zeros((Lm, E, 3), np.float32)
    handles = []

    for li, (L, blk) in enumerate(blocks):
        def moe_pre(mod, a, L=L):
            inputs[L].append(capture_hf.bf16_bits(a[0].reshape(-1, a[0].shape[-1])))
        handles.append(blk.register_forward_pre_hook(moe_pre))

        def gate_post(mod, a, out, li=li, L=L):
            logits, _, idx = out
            sel_cpu[L].append(idx.cpu().numpy())
            current[L] = idx
            if softmax:
                # the same router's choice with ties to the lower index (what
                # torch.topk gives on a GPU); the forward itself is left as
                # the model ran it, so every layer sees the captured input
                probs = torch.softmax(logits.float(), dim=-1)
                srt = torch.sort(probs, dim=-1, descending=True)[0]
                ties[li] += int((srt[:, k - 1] == srt[:, k]).sum()) if k < E else 0
                current[L] = stable_topk(probs, k)
            sel_model[L].append(current[L].cpu().numpy())
        handles.append(blk.gate.register_forward_hook(gate_post))

        def experts_pre(mod, a, li=li, L=L):
            x, idx = a[0], current[L]
            for e in range(E):
                rows = (idx == e).any(dim=-1).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                xe = x[rows]
                g, u = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                h = mod.act_fn(g) * u
                count[li, e] += rows.numel()
                amax_x[li, e] = max(amax_x[li, e], float(xe.abs().max().float()))
                amax_h[li, e] = max(amax_h[li, e], float(h.abs().max().float()))
        handles.append(blk.experts.register_forward_pre_hook(experts_pre))
        W, D = blk.experts.gate_up_proj.detach(), blk.experts.down_proj.detach()
        inter = W.shape[1] // 2
        for e in range(E):
            wamax[li, e, 0] = float(W[e, :inter].abs().max().float())
            wamax[li, e, 2] = float(W[e, inter:].abs().max().float())
            wamax[li, e, 1] = float(D[e].abs().max().float())

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.inference_mode():
        for ids, mask in cap.batches(seqs, args.batch_size, pad):
            if not all(all(m) for m in mask):
                fail("a padded batch: use a --max-tokens that fills every batch")
            model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  use_cache=False)
    for h in handles:
        h.remove()

    T = sum(len(s) for s in seqs)
    assign = np.zeros((Lm, T, E), np.bool_)
    assign_cpu = np.zeros((Lm, T, E), np.bool_)
    with h5py.File(args.act, "r") as f:
        for li, L in enumerate(layers):
            got = capture_hf.file_bits(f[f"layers/{L}/hidden"])
            want = np.concatenate(inputs[L])
            if got.shape != want.shape or np.any(got != want):
                fail(f"{args.act}: layer {L} does not hold the MoE block's input bit for bit")
            for dst, src in ((assign, sel_model[L]), (assign_cpu, sel_cpu[L])):
                idx = np.concatenate(src)
                if idx.shape != (T, k):
                    fail(f"layer {L}: the router chose {idx.shape}, expected {(T, k)}")
                np.put_along_axis(dst[li], idx, True, axis=1)

        def kind(L):
            v = f[f"layers/{L}"].attrs.get("kind", b"")
            return v.decode() if isinstance(v, bytes) else str(v)
        extra = set(f["layers"].keys()) - {str(L) for L in layers}
        if any(kind(L) != "dense" for L in extra):
            fail(f"{args.act}: layers {sorted(extra)} are neither MoE nor dense layers")
    # probabilities at the k-th place, to tell exact ties from real differences
    np.savez(args.out, layers=np.array(layers), assign=assign, assign_cpu=assign_cpu,
             tokens_per_expert=count, amax_x=amax_x, amax_h=amax_h, weight_amax=wamax,
             ties=ties)
    print(f"router_hf: reference {args.family} (transformers {transformers.__version__}): "
          f"{T} tokens, MoE layers {layers}, {E} experts, k {k}; the activation file matches "
          f"the MoE inputs bit for bit; tokens with an exact tie at the k-th place per layer "
          f"{ties.tolist()}; tokens whose CPU torch.topk choice differs from the lower-index "
          f"rule per layer {[int((assign[i] != assign_cpu[i]).any(axis=1).sum()) for i in range(Lm)]}")
    return 0


def cmd_check(args):
    r = np.load(args.ref)
    with h5py.File(args.out, "r") as f:
        layers = [int(x) for x in f["layers"][...]]
        tok = f["tokens_per_expert"][...]          # [L, C, E], one token per chunk
        counts = f["chunk_token_count"][...]
        cal = f["input_amax_calibrated"][...]
        wa = f["weight_amax"][...]
        prec = f.attrs.get("router_logits", b"?")
    prec = prec.decode() if isinstance(prec, bytes) else str(prec)
    if layers != [int(x) for x in r["layers"]]:
        fail(f"layers {layers} vs reference {list(r['layers'])}")
    if not np.all(counts == 1):
        fail(f"{args.out}: run it with --chunk-tokens 1 (one token per chunk)")
    got = tok > 0
    want, want_cpu = r["assign"], r["assign_cpu"]
    if got.shape != want.shape:
        fail(f"{args.out}: assignments {got.shape}, reference {want.shape}")
    k = int(want[0, 0].sum())
    total = want.sum()
    agree = float((got & want).sum()) / total
    agree_cpu = float((got & want_cpu).sum()) / total
    ok = True
    for li, L in enumerate(layers):
        bad = np.flatnonzero((got[li] != want[li]).any(axis=1))
        bad_cpu = np.flatnonzero((got[li] != want_cpu[li]).any(axis=1))
        print(f"router_hf: layer {L} ({prec} logits): {len(bad)} of {got.shape[1]} tokens routed "
              f"differently from the model (lower index on ties), {len(bad_cpu)} from the "
              f"model's CPU torch.topk order; {int(r['ties'][li])} tokens tie at the k-th place")
    print(f"router_hf: {args.out}: {agree:.6f} of {int(total)} token-expert assignments equal "
          f"the model's (lower index on ties), {agree_cpu:.6f} the CPU torch.topk order "
          f"(k = {k})")
    if args.report_only:
        return 0
    if agree < args.min_agree:
        fail(f"{args.out}: only {agree:.6f} of the assignments equal the model's "
             f"(at least {args.min_agree} required)")
    # a token routed otherwise than torch's CPU order must be one whose CPU
    # choice broke an exact tie differently from the lower-index rule
    cpu_same = (got == want_cpu).all(axis=2)
    tie_tok = (want != want_cpu).any(axis=2)
    if not np.all(cpu_same | tie_tok):
        li, t = np.argwhere(~(cpu_same | tie_tok))[0]
        fail(f"layer {layers[li]} token {t}: moecal chose {np.flatnonzero(got[li, t]).tolist()}, "
             f"the model {np.flatnonzero(want_cpu[li, t]).tolist()}, and no tie explains it")
    t_got = got.sum(axis=1)
    for li, L in enumerate(layers):
        rt = r["tokens_per_expert"][li]
        if not np.array_equal(t_got[li], rt):
            print(f"router_hf: layer {L}: token counts {t_got[li].tolist()} vs {rt.tolist()}")
            ok = False
        x_ok = np.all(cal[li][:, [0, 2]] == r["amax_x"][li][:, None])
        routed = rt > 0
        ref_h = r["amax_h"][li].astype(np.float64)
        rel = np.where(routed, np.abs(cal[li, :, 1] - ref_h) / np.maximum(ref_h, 1e-30), 0.0)
        w_ok = np.array_equal(wa[li], r["weight_amax"][li])
        print(f"router_hf: layer {L}: w1/w3 input amax {'exact' if x_ok else 'DIFFER'}, w2 input "
              f"amax max rel diff {rel.max():.2e}, weight amax {'exact' if w_ok else 'DIFFER'}")
        ok &= bool(x_ok) and rel.max() <= RTOL_W2 and w_ok
    if not ok:
        fail(f"{args.out} disagrees with the model's own routing and experts")
    print(f"router_hf: {args.out} agrees with the model: routing {agree:.6f}, amax within the "
          "tolerances")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("family", choices=FAMILIES)
    b.add_argument("model_dir")
    b.add_argument("text")
    r = sub.add_parser("reference")
    r.add_argument("family", choices=FAMILIES)
    r.add_argument("model_dir")
    r.add_argument("act")
    r.add_argument("out")
    r.add_argument("--text", required=True)
    r.add_argument("--seq-len", type=int, required=True)
    r.add_argument("--batch-size", type=int, required=True)
    r.add_argument("--max-tokens", type=int, required=True)
    r.add_argument("--capture", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "..", "scripts", "moecal-capture"))
    c = sub.add_parser("check")
    c.add_argument("out")
    c.add_argument("ref")
    c.add_argument("--min-agree", type=float, default=0.9999)
    c.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    return {"build": cmd_build, "reference": cmd_reference, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
