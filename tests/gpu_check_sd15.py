"""A GPU check of the sd15 code path at full size, without downloads: ``python tests/gpu_check_sd15.py``.

Builds a randomly initialised pipeline with SD 1.5's layer structure, then, in fp16 and fp32: guided
sampling at 512x512 with attention recording (16x16 maps), the unguided path against the pipeline,
the attention processors restored, the cost of guided sampling against its pass-count floor, and a
short textual inversion (``CHECK_INV_STEPS`` steps of batch 1 on two random photos): its embedding must be
finite and move, in fp16 too (the trained row and its optimiser state are kept in fp32).
Prints JSON and writes it to ``$OUT/gpu_check.json`` (``/tmp`` without ``OUT``). ``CHECK_DEVICE``,
``CHECK_WIDTH``, ``CHECK_STEPS`` and ``CHECK_SIZE`` shrink it for a CPU smoke run
(``CHECK_DEVICE=cpu CHECK_WIDTH=0.1 CHECK_STEPS=3 CHECK_SIZE=128``). Not collected by pytest.
"""
import json, os, sys, time
sys.path.insert(0, "tests")
import numpy as np
import torch
from sd15_shapes import sd15_pipeline
from compinv_utils.world import World
from compinv_utils.guidance import GuidanceConfig, guided_generate, measure_cost
from compinv_utils.inversion import InversionConfig, invert, unload
from PIL import Image

out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
dev = torch.device(os.environ.get("CHECK_DEVICE", "cuda"))
W = float(os.environ.get("CHECK_WIDTH", "1.0")); STEPS = int(os.environ.get("CHECK_STEPS", "25")); SIZE = int(os.environ.get("CHECK_SIZE", "512"))
INV_STEPS = int(os.environ.get("CHECK_INV_STEPS", "20"))
for dtype in (torch.float16, torch.float32):
    t = time.perf_counter()
    pipe = sd15_pipeline(width=W).to(dev, dtype)
    world = World("sd15-random", pipe, ["cat", "dog"], [], None, None, None, lambda ims, t: [[] for _ in ims],
                  dev, dtype, guidance_scale=7.5, num_inference_steps=STEPS)
    r = {"build_s": time.perf_counter() - t}
    before = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    prompts = ["a cat and a dog", "a dog and a cat"]
    words = [["cat", "dog"], ["dog", "cat"]]
    boxes = [[(0.0, 0.2, 0.5, 0.8), (0.5, 0.2, 1.0, 0.8)]] * 2
    torch.cuda.reset_peak_memory_stats() if dev.type == 'cuda' else None
    plain = guided_generate(world, prompts, words, boxes, seeds=[0, 1], config=GuidanceConfig(guided_steps=0), record=True, batch_size=2, height=SIZE, width=SIZE)
    g = guided_generate(world, prompts, words, boxes, seeds=[0, 1], config=GuidanceConfig(guided_steps=min(10, STEPS)), record=True, batch_size=2, height=SIZE, width=SIZE)
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    r["maps_shape"] = list(g.maps.shape)
    r["loss_first_last"] = [float(np.nanmean(g.losses[0])), float(np.nanmean(g.losses[-1]))]
    r["losses_finite"] = bool(np.isfinite(g.losses).all())
    r["inside_plain_guided"] = [float(plain.inside.mean()), float(g.inside.mean())]
    r["image_size"] = list(g.images[0].size)
    ref = world.generate(prompts, seeds=[0, 1], batch_size=2, height=SIZE, width=SIZE)
    r["pipeline_vs_unguided_max_px"] = float(max(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for a, b in zip(ref, plain.images)))
    r["processors_restored"] = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()} == before
    r["cost"] = measure_cost(world, prompts * 2, [words[0]] * 4, boxes * 2, seeds=[0, 1, 2, 3], reps=5, config=GuidanceConfig(guided_steps=min(10, STEPS)), height=SIZE, width=SIZE)
    photos = [Image.fromarray(np.random.default_rng(k).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for k in range(2)]
    cat_id = pipe.tokenizer.encode("cat", add_special_tokens=False)[0]
    init = pipe.text_encoder.get_input_embeddings().weight[cat_id].detach().float().cpu().clone()
    torch.cuda.reset_peak_memory_stats() if dev.type == 'cuda' else None
    t = time.perf_counter()
    res = invert(pipe, photos, "<check>", "cat", InversionConfig(steps=INV_STEPS, batch_size=1), progress=False)
    r["inversion"] = {"steps": INV_STEPS, "s_per_step": (time.perf_counter() - t) / INV_STEPS,
                      "finite": bool(torch.isfinite(res.embeddings).all()), "moved": float((res.embeddings[0] - init).abs().max()),
                      "losses_finite": bool(np.isfinite(res.losses).all()),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
    unload(pipe, "<check>")
    out[str(dtype)] = r
    print(json.dumps(r, indent=1), flush=True)
    del pipe, world
    torch.cuda.empty_cache() if dev.type == 'cuda' else None
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_check.json"), "w"), indent=1)
