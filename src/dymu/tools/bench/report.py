"""The `dymu bench` report: targets met or not, and the markdown tables (no measuring here)."""

from __future__ import annotations

import math

# Targets of the benchmark issue: (key, description, goal).
TARGETS = {
    "encoder_b1": "encoder speedup >= 0.85 x FLOP-ideal at batch 1 (every preset)",
    "vtu_93": "VTU prefill >= 3.5x faster than full at N_un = 93",
    "vtu_208": "VTU prefill >= 2.2x faster than full at N_un = 208",
    "merge_off": "merge-off overhead <= 3%",
    "calibration": "calibration loop >= 0.8 x plain-forward throughput",
    "packed_b8": "packed encoder at batch 8 (calibrated mid) >= 0.9 x FLOP-ideal",
    "packed_b1": "packed encoder at batch 1 no slower than padded (<= 2%)",
    "packed_calibration": "calibration at batch 32: packed >= 1.5 x padded throughput",
    "kv_compact": "compact KV cache bytes <= 1.05 x (text + U) / (text + N) of stock (every preset)",
    "decode_b1": "decode ms/token with the compact cache <= 1.15 x stock at batch 1 (every preset)",
    "decode_b8": "decode ms/token with the compact cache <= VTU with the full cache at batch 8 (every preset)",
}


def evaluate_targets(result: dict) -> list[dict]:
    out = []
    enc = [r for r in result.get("encoder") or [] if r["batch"] == 1 and r["variant"] != "full"]
    if enc:
        worst = min(enc, key=lambda r: r["quotient"])
        out.append(dict(key="encoder_b1", target=TARGETS["encoder_b1"], goal=0.85,
                        measured=worst["quotient"], met=all(r["quotient"] >= 0.85 for r in enc),
                        detail=", ".join(f"{r['variant']} {r['quotient']:.2f}" for r in enc)))
    pre = {r["variant"]: r for r in result.get("prefill") or []}
    for key, preset, goal in (("vtu_93", "low", 3.5), ("vtu_208", "mid", 2.2)):
        row = pre.get(f"VTU {preset}")
        if row:
            out.append(dict(key=key, target=TARGETS[key], goal=goal, measured=row["speedup"],
                            met=row["speedup"] >= goal,
                            detail=f"N_un {row['n_un']}: {row['speedup']:.2f}x (FLOP-ideal {row['flop_ideal']:.2f}x)"))
    off = result.get("merge_off")
    if off:
        out.append(dict(key="merge_off", target=TARGETS["merge_off"], goal=0.03, measured=off["overhead"],
                        met=off["overhead"] <= 0.03,
                        detail=f"{off['overhead'] * 100:+.1f}% (paired {off['overhead_paired'] * 100:+.1f}%)"))
    cal = result.get("calibration")
    if cal:
        out.append(dict(key="calibration", target=TARGETS["calibration"], goal=0.8, measured=cal["ratio"],
                        met=cal["ratio"] >= 0.8,
                        detail=f"{cal['calibrate_images_per_s']:.3g} vs {cal['plain_images_per_s']:.3g} images/s; "
                               f"with the per-image check {cal['ratio_checked']:.2f}x"))
    packed = result.get("packed")
    if packed:
        rows = {(r["batch"], r["variant"]): r for r in packed["rows"]}
        big = sorted({b for b, _ in rows if b > 1}, key=lambda b: (b != 8, b))  # batch 8 (--quick: its own)
        row = rows.get((big[0], "packed")) if big else None
        if row:
            pad = rows[(big[0], "padded")]
            out.append(dict(key="packed_b8", target=TARGETS["packed_b8"], goal=0.9, measured=row["quotient"],
                            met=row["quotient"] >= 0.9,
                            detail=f"batch {row['batch']}: quotient {row['quotient']:.2f} ({row['speedup']:.2f}x of "
                                   f"{row['flop_ideal']:.2f}x; "
                                   f"padded {pad['quotient']:.2f})"))
        row = rows.get((1, "packed"))
        if row:
            slower = 1 / row["speedup"] - 1
            out.append(dict(key="packed_b1", target=TARGETS["packed_b1"], goal=0.02, measured=slower,
                            met=slower <= 0.02,
                            detail=f"{slower * 100:+.1f}% time (paired {(1 / row['speedup_paired'] - 1) * 100:+.1f}%)"))
        cal = packed["calibration"]
        out.append(dict(key="packed_calibration", target=TARGETS["packed_calibration"], goal=1.5, measured=cal["ratio"],
                        met=cal["ratio"] >= 1.5,
                        detail=f"{cal['packed_images_per_s']:.3g} vs {cal['padded_images_per_s']:.3g} images/s = "
                               f"{cal['ratio']:.2f}x (batch {cal['batch_size']}, {cal['layers']} layers)"))
    decode = result.get("decode")
    if decode:
        rows = {(r["batch"], r["variant"]): r for r in decode["rows"]}
        compact = [r for r in decode["rows"] if r["batch"] == 1 and r["kv_cache"] == "compact"]
        worst = max(compact, key=lambda r: r["kv_ratio"] / r["kv_ideal_ratio"])
        out.append(dict(key="kv_compact", target=TARGETS["kv_compact"], goal=1.05,
                        measured=worst["kv_ratio"] / worst["kv_ideal_ratio"],
                        met=all(r["kv_ratio"] <= 1.05 * r["kv_ideal_ratio"] for r in compact),
                        detail=", ".join(f"{r['preset']} {r['kv_ratio']:.3f} (ideal {r['kv_ideal_ratio']:.3f})"
                                         for r in compact)))
        big = max(decode["settings"]["batches"])
        for key, batch, base, goal in (("decode_b1", 1, "stock", 1.15), ("decode_b8", big, "full", 1.0)):
            pairs = [(r, rows[(batch, "stock" if base == "stock" else f"VTU {r['preset']} full")])
                     for r in decode["rows"] if r["batch"] == batch and r["kv_cache"] == "compact"]
            ratios = [r["ms_per_token"] / b["ms_per_token"] for r, b in pairs]
            out.append(dict(key=key, target=TARGETS[key], goal=goal, measured=max(ratios),
                            met=all(x <= goal for x in ratios),
                            detail=", ".join(f"{r['preset']} {r['ms_per_token']:.0f} vs {b['ms_per_token']:.0f} ms "
                                             f"({x:.2f}x)" for (r, b), x in zip(pairs, ratios))))
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


SECTION_TITLES = {"encoder": "encoder", "packed": "packed vs padded", "prefill": "prefill", "exact": "exact Eq. 10",
                  "attention_flops": "attention FLOPs", "calibration": "calibration", "merge_off": "merge-off",
                  "onevision": "OneVision prefill", "decode": "decode", "internvl": "InternVL"}


def smoke_markdown(result: dict) -> str:
    """`--quick`: which sections ran, and no figures: toy sizes and one run make times and ratios meaningless."""
    m, s = result["machine"], result["settings"]
    ran = []
    for key, title in SECTION_TITLES.items():
        value = result.get(key)
        if value:
            if key == "onevision" and value.get("merge_points"):
                merge_rows = sum(len(value["merge_points"][k]["rows"]) for k in ("image", "video"))
                title += f" ({len(value['rows'])} rows; merge points: {merge_rows} rows)"
            ran.append(f"{title} ({len(value)} rows)" if isinstance(value, list) else title)
    return "\n".join([
        f"## dymu bench --quick: smoke test, no figures — {result['date']}",
        "",
        f"Ran at toy sizes, {s['runs']} run each: {', '.join(ran) or 'nothing'}. Every code path of the "
        "benchmark works. Times, speedups and targets at these sizes say nothing about dymu's speed, so none are "
        "shown (the --json file keeps the raw measurements, for debugging); run `dymu bench` for figures.",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores; torch {m['torch']}, transformers {m['transformers']}; "
        f"{s['device']} {s['dtype']}; random weights. Total time: {result['elapsed_s']:.0f} s.",
    ])


def markdown(result: dict) -> str:
    m = result["machine"]
    s = result["settings"]
    if s["plan"] == "quick":
        return smoke_markdown(result)
    lines = [
        f"## dymu bench ({s['plan']}) — {result['date']}",
        "",
        f"Machine: {m['cpu']}{' (virtual machine)' if m.get('virtual_machine') else ''}, {m['cpu_cores']} cores "
        f"({m['torch_threads']} torch threads; {'/'.join(m.get('cpu_isa') or []) or 'no AVX2'})"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}; {s['device']} {s['dtype']}. "
        f"Load average before/after: {result.get('loadavg_before')} / {result.get('loadavg_after')}.",
        "",
        f"Random weights (speed does not depend on the weights). Medians of {s['runs']} runs after "
        f"{s['warmup']} warm-up round(s); compared sides interleaved round-robin in one process. "
        "Speedup = median(full) / median(variant); FLOP-ideal = FLOPs(full) / FLOPs(variant) from the "
        "tokens / rows actually processed; quotient = speedup / FLOP-ideal.",
        "",
    ]
    enc = result.get("encoder")
    if enc:
        c = s["clip"]
        lines += [f"### Encoder: CLIP ViT (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                  f"{c['num_attention_heads']} heads, {c['image_size']} px / {c['patch_size']}), read at layer "
                  f"{s['feature_layer']}", "",
                  "| batch | layers run | variant | merge rule | tokens kept | time (ms) | speedup | FLOP-ideal | quotient |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in enc:
            lines.append(f"| {r['batch']} | {r['layers_run']} | {r['variant']} | {r['rule']} | "
                         f"{r['tokens_at_feature_layer']:.0f} | {_ms(r['median_s'])} | {r['speedup']:.2f}x | "
                         f"{r['flop_ideal']:.2f}x | {r['quotient']:.2f} |")
        lines.append("")
    packed = result.get("packed")
    if packed:
        lines += [f"### Packed vs padded batches: calibrated mid thresholds, diverse images, {packed['rows'][0]['layers_run']} "
                  "layers (FLOP-ideal from the tokens each image kept per layer, Σ n_i)", "",
                  "| batch | variant | tokens kept (min–max) | rows per layer (alive / padded layout) | time (ms) | "
                  "speedup | FLOP-ideal | quotient |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in packed["rows"]:
            toks = r["tokens_at_feature_layer"]
            ideal = "-" if math.isnan(r["flop_ideal"]) else f"{r['flop_ideal']:.2f}x"
            quotient = "-" if math.isnan(r["quotient"]) else f"{r['quotient']:.2f}"
            lines.append(f"| {r['batch']} | {r['variant']} | {min(toks)}–{max(toks)} | "
                         f"{r['alive_rows_per_layer_mean']:.0f} / {r['padded_rows_per_layer_mean']:.0f} | "
                         f"{_ms(r['median_s'])} | {r['speedup']:.2f}x vs {r['speedup_vs']} | {ideal} | {quotient} |")
        cal = packed["calibration"]
        lines += ["", f"Calibration, {cal['images']} images in batches of {cal['batch_size']}, first {cal['layers']} "
                  f"layers, r = {cal['r_per_layer']:.0f} per layer: padded {cal['padded_images_per_s']:.3g} images/s, "
                  f"packed {cal['packed_images_per_s']:.3g} images/s = {cal['ratio']:.2f}x (paired {cal['ratio_paired']:.2f}x); "
                  f"thresholds {'identical' if cal['thresholds_identical'] else 'differ by at most %.2g' % cal['max_threshold_difference']}.",
                  ""]
    pre = result.get("prefill")
    if pre:
        p = s["llama"]
        lines += [f"### Prefill: Llama decoder layers (hidden {p['hidden_size']}, MLP {p['intermediate_size']}, "
                  f"{p['num_attention_heads']} heads), {pre[0]['layers']} layers, {pre[0]['positions']} positions "
                  f"({s['text_before']} text + {pre[0]['positions'] - s['text_before'] - s['text_after']} visual + "
                  f"{s['text_after']} text), sdpa", "",
                  "| variant | N_un | rows per layer | time (ms) | speedup | FLOP-ideal | quotient |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in pre:
            lines.append(f"| {r['variant']} | {r['n_un'] if r['n_un'] is not None else '-'} | {r['rows_per_layer']} | "
                         f"{_ms(r['median_s'])} | {r['speedup']:.2f}x | {r['flop_ideal']:.2f}x | {r['quotient']:.2f} |")
        lines.append("")
    ex = result.get("exact")
    if ex:
        lines += [f"### Exact Eq. 10 attention vs the gather path (eager attention, {ex[0]['layers']} layer(s), "
                  f"{ex[0]['positions']} positions)", "",
                  "| path | N_un | runs | time (ms) | speedup vs full | time vs fast VTU |", "|---|---:|---:|---:|---:|---:|"]
        for r in ex:
            lines.append(f"| {r['variant']} | {r['n_un'] if r['n_un'] is not None else '-'} | {r['runs']} | {_ms(r['median_s'])} | "
                         f"{r['speedup_vs_full']:.2f}x | {r['time_vs_fast']:.2f}x |")
        lines.append("")
    fl = result.get("attention_flops")
    if fl:
        lines += ["### Attention FLOPs per layer (paper Table 1 form: N = 576, 32 heads, head dim 128; MFLOPs)", "",
                  "| variant | N_un | paper | paper's formula | logits (honest) | softmax | P·V | total (honest) | vs full |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in fl:
            paper = "-" if math.isnan(r["paper_mflops"]) else f"{r['paper_mflops']:.1f}"
            formula = "-" if math.isnan(r["paper_formula_mflops"]) else f"{r['paper_formula_mflops']:.1f}"
            lines.append(f"| {r['variant']} | {r['n_un']} | {paper} | {formula} | "
                         f"{r['logits_mflops']:.1f} | {r['softmax_mflops']:.1f} | {r['pv_mflops']:.1f} | "
                         f"{r['total_mflops']:.1f} | {r['vs_full']:.2f} |")
        lines += ["", "The paper's numbers equal N²·d·H for full and 2·N_un²·d·H for VTU (multiply-adds of the "
                  "products among unique rows only): the O(N²) sparse products that expand them to N×N with the "
                  "cos/sin diagonals, the N×N softmax and P·V are not counted. Counted honestly (multiply and add "
                  "= 2 FLOPs, Eq. 10 as written: 12 FLOPs per entry and frequency pair), VTU attention costs "
                  "more than full attention (a rewrite with cos/sin of position differences brings its expansion down "
                  "to 2·N²·d·H, the cost of full QKᵀ); dymu's gather path costs exactly full attention. VTU saves time "
                  "in the projections and the MLP, not in attention.", ""]
    cal = result.get("calibration")
    if cal:
        lines += [f"### Calibration throughput ({cal['images']} images, batches of {cal['batch_size']}, first "
                  f"{cal['layers']} layers of the encoder above, r = {cal['r_per_layer']} per layer)", "",
                  "| side | images/s | ratio |", "|---|---:|---:|",
                  f"| plain stock forward (decode + processor + encoder) | {cal['plain_images_per_s']:.3g} | 1.00 |",
                  f"| dymu.calibrate, the loop (check_images=0) | {cal['calibrate_images_per_s']:.3g} | {cal['ratio']:.2f} |",
                  f"| dymu.calibrate with the per-image check on every image (the default up to 512) | "
                  f"{cal['checked_images_per_s']:.3g} | {cal['ratio_checked']:.2f} |", ""]
    off = result.get("merge_off")
    if off:
        lines += ["### Merge-off overhead (batch 1, all layers to the feature layer, encoder above)", "",
                  "| side | time (ms) | overhead |", "|---|---:|---:|",
                  f"| stock | {_ms(off['stock_median_s'])} | - |",
                  f"| patched, thresholds +inf | {_ms(off['patched_median_s'])} | {off['overhead'] * 100:+.1f}% |", "",
                  f"{len(off['stock_times_s'])} runs each; overhead = ratio of the medians − 1 (median of the per-round "
                  f"ratios: {off['overhead_paired'] * 100:+.1f}%).", ""]
    ov = result.get("onevision")
    if ov:
        lines += [onevision_markdown(ov, s), ""]
    if result.get("smolvlm"):
        from .sections.smolvlm import markdown as smolvlm_markdown

        lines += [smolvlm_markdown(result["smolvlm"]), ""]
    if result.get("internvl"):
        from .sections.internvl import internvl_markdown

        lines += [internvl_markdown(result["internvl"]), ""]
    if result.get("decode"):
        from .decode import decode_markdown

        lines += [decode_markdown(result["decode"]), ""]
    tg = result.get("targets")
    if tg:
        lines += ["### Targets", ""]
        lines += ["| target | measured | met |", "|---|---|---|"]
        for t in tg:
            lines.append(f"| {t['target']} | {t['detail']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    sec = ", ".join(f"{k} {v:.0f} s" for k, v in (result.get("section_s") or {}).items())
    lines.append(f"Total benchmark time: {result['elapsed_s']:.0f} s ({sec}).")
    return "\n".join(lines)


def onevision_markdown(ov: dict, s: dict) -> str:
    """The OneVision prefill tables: fixed-r presets on one AnyRes photo, then full vs the merge points
    vit / post / both on a downsampled photo and a video (``s``: the result's settings)."""
    q, img, rows = s["onevision_qwen2"], ov["image"], ov["rows"]
    before, after = s["onevision_text"]
    lines = [f"### OneVision prefill: Qwen2 decoder layers (hidden {q['hidden_size']}, MLP {q['intermediate_size']}, "
             f"{q['num_attention_heads']} heads / {q['num_key_value_heads']} KV heads), {rows[0]['layers']} layers, "
             f"{rows[0]['positions']} positions ({before} text + one AnyRes image of {img['positions']} packed "
             f"positions from {img['crops']} crops of {img['tokens_per_crop']} tokens + {after} text), sdpa, "
             f"{s['onevision_runs']} runs", "",
             "| variant | visual groups | rows per layer | time (ms) | speedup | FLOP-ideal | quotient |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['n_un'] if r['n_un'] is not None else '-'} | {r['rows_per_layer']} | "
                     f"{_ms(r['median_s'])} | {r['speedup']:.2f}x | {r['flop_ideal']:.2f}x | {r['quotient']:.2f} |")
    mp = ov.get("merge_points")
    if mp:
        image, video = mp["image"], mp["video"]
        lines += ["", f"#### OneVision merge points: full vs vit / post / both (mid thresholds), same Qwen2 layers, "
                  f"{before} + {after} text positions around one input: a {image['size'][0]}x{image['size'][1]} photo "
                  f"({image['crops']} crops, canvas downsampled by anyres_max_9) or a video of {video['frames']} frames", "",
                  "| input | merge point | encoder tokens | LLM rows / stock positions | rows per layer | time (ms) | "
                  "speedup | FLOP-ideal | quotient | encoder FLOP-ideal |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("image", "video"):
            for r in mp[name]["rows"]:
                lines.append(f"| {name} | {r['variant']} | {r['encoder_tokens']} | {r['llm_rows']} / "
                             f"{r['stock_positions']} | {r['rows_per_layer']} | {_ms(r['median_s'])} | "
                             f"{r['speedup']:.2f}x | {r['flop_ideal']:.2f}x | {r['quotient']:.2f} | "
                             f"{r['encoder_flop_ideal']:.2f}x |")
    return "\n".join(lines)
