"""Measure a demo VLM like a VLM (full cache, unseen test scenes) and print JSON.

    HF_HUB_OFFLINE=1 python jobs/eval_demo.py --n 500 --seed 0                 # demo (v1)
    HF_HUB_OFFLINE=1 python jobs/eval_demo.py --model demo-v2 --dir /tmp/demo-v2 --n 200

Quality: caption exact match and object F1, description ROUGE-L (demo-v2), VQA accuracy by
question kind, and the same with blank images. With --probe-scenes N > 0, also per layer: the
share of attention the text queries give to BOS, the text before the image, the image block and
the text after it, and the key cosine of neighbouring image tokens against random pairs.
"""

import argparse
import json


def probe(spec, model_dir, n: int, seed: int) -> dict:
    """Attention shares (captions, eager attention) and key redundancy on `n` test scenes."""
    from elastic_ray.data.shapes import CAPTION_INSTRUCTION
    from elastic_ray.demo.probes import attention_shares, key_redundancy
    from elastic_ray.demo.quality import CAPTION_TOKENS, load_demo

    model, processor = load_demo(model_dir, attn_implementation="eager")
    scenes = spec.scenes(n, seed=seed, split="test")
    images = [s.image for s in scenes]
    return {
        "probe_scenes": n,
        "attention": attention_shares(model, processor, images, [CAPTION_INSTRUCTION] * n, CAPTION_TOKENS),
        "key_cosine": key_redundancy(model, processor, images, CAPTION_INSTRUCTION),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="which demo model (data, prompt): demo or demo-v2")
    parser.add_argument("--dir", help="model directory; default: the model's folder in the package")
    parser.add_argument("--n", type=int, default=500, help="number of test scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-blank", action="store_true", help="skip the blank-image control")
    parser.add_argument("--probe-scenes", type=int, default=0, help="scenes for the attention and key probes")
    args = parser.parse_args()
    import torch  # after parsing: --help answers at once

    from elastic_ray.demo.build import SPECS
    from elastic_ray.demo.quality import evaluate_demo

    if args.model not in SPECS:
        parser.error(f"--model must be one of {sorted(SPECS)}, got {args.model!r}")
    torch.set_num_threads(args.threads)
    spec = SPECS[args.model]
    model_dir = args.dir or spec.out_dir
    result = {}
    if args.n:
        result = evaluate_demo(spec, model_dir, n=args.n, seed=args.seed, batch_size=args.batch_size,
                               blank=not args.no_blank)
    if args.probe_scenes:
        result |= probe(spec, model_dir, args.probe_scenes, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
