"""`clipvqd eval` on hand-made samples folders: judge numbers, CLIP/FID/IS labelling, the sweep's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipvqd.clip import build_model, save_tiny_clip
from clipvqd.config import Config
from clipvqd.errors import UserError
from clipvqd.evaluation import judging
from clipvqd.evaluation.sweep import parse_sweeps, plot, reranking_pair
from clipvqd.plot import line_chart, nice_ticks
from clipvqd.project import Project
from clipvqd.shapes.captions import parse_prompt
from clipvqd.shapes.world import Attributes, Jitter, render
from clipvqd.stages import eval as eval_stage

SMALL_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """An untrained (but fixed) small CLIP in the tiny-CLIP file format: the shipped one may not exist yet."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "small_clip.safetensors"
    save_tiny_clip(build_model(SMALL_CLIP), SMALL_CLIP, path)
    return path


def _config(clip_file, **values) -> Config:
    base = {"clip.pretrained": str(clip_file), "eval.fid": False, "eval.inception_score": False,
            "project.device": "cpu", "project.threads": 1, "data.image_size": 32}
    return Config().replace(**{**base, **values})


def _write_samples(folder, items):
    """items: [(prompt, Attributes, Jitter)] -> images/*.png and index.jsonl like `clipvqd sample`."""
    rows = []
    for i, (prompt, attrs, jitter) in enumerate(items):
        file = f"images/{i:03d}.png"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(attrs, 32, jitter)).save(folder / file)
        rows.append({"file": file, "prompt": prompt, "seed": i, "clip_score": 0.0})
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


A = Attributes


def _hand_made(folder):
    """'a red circle': 3 of 4 images red circles (one blue); 'a blue circle' (held-out pair): 1 circle of 2.
    Two of the red circles are identical renders."""
    return _write_samples(folder, [
        ("a red circle", A("circle", "red", "white", "large", "center"), Jitter()),
        ("a red circle", A("circle", "red", "white", "large", "center"), Jitter()),
        ("a red circle", A("circle", "red", "gray", "small", "left"), Jitter()),
        ("a red circle", A("circle", "blue", "white", "large", "top"), Jitter()),
        ("a blue circle", A("circle", "blue", "black", "large", "center"), Jitter()),
        ("a blue circle", A("square", "blue", "black", "large", "center"), Jitter()),
    ])


def test_judge_numbers_on_a_hand_made_folder(tmp_path, clip_file):
    project = Project(tmp_path)
    folder = _hand_made(tmp_path / "samples" / "mine")
    result = eval_stage.run(_config(clip_file), project, samples_dir=folder)
    report = json.loads((tmp_path / "eval" / "mine.json").read_text())
    m = report["metrics"]
    assert result["judge in-distribution, all samples"] == "shape 1.000; colour 0.750; all named 0.750 (of 4 images)"
    assert result["judge held-out, all samples"] == "shape 0.500; colour 1.000; all named 0.500 (of 2 images)"
    assert result["images"] == 6 and result["prompts"] == 2 and result["samples per prompt"] == 4
    assert m["judge in-distribution, all samples: shape"] == 1.0
    assert m["judge in-distribution, all samples: colour"] == 0.75
    assert m["judge in-distribution, all samples: all named"] == 0.75
    assert m["judge in-distribution, all samples: images"] == 4
    assert m["judge held-out, all samples: shape"] == 0.5
    assert m["judge held-out, all samples: colour"] == 1.0
    assert m["judge held-out, all samples: all named"] == 0.5
    assert "judge in-distribution, all samples: size" not in m  # no prompt names the size
    assert m["judge in-distribution, best of 4 by CLIP: images"] == 1
    assert m["judge held-out, best of 4 by CLIP: images"] == 1
    assert result["distinct images (share)"] == pytest.approx(5 / 6)
    assert result["distinct images per prompt (mean share)"] == pytest.approx((3 / 4 + 1) / 2)
    # open attributes: background (3 values), size (2), position (5); per prompt distinct judged / vocabulary
    red = (2 / 3 + 2 / 2 + 3 / 5) / 3
    blue = (1 / 3 + 1 / 2 + 1 / 5) / 3
    assert result["open-attribute coverage (judged)"] == pytest.approx((red + blue) / 2)
    cos = result["CLIP score (cosine, paper), all samples"]
    assert -1 <= cos <= 1
    assert 0 <= result["CLIP score (x100 clamped, torchmetrics), all samples"] <= 100
    assert report["protocol"] == "shapes" and report["images"] == 6
    assert report["metrics"]["judge held-out, all samples: all named"] == 0.5
    assert report["config"]["clip"]["pretrained"] == str(clip_file)
    assert "| judge held-out, all samples: all named | 0.5 |" in (tmp_path / "eval" / "mine.md").read_text()


def test_clip_score_variants_match_a_direct_computation(tmp_path, clip_file):
    from clipvqd.clip import load_clip
    from clipvqd.data import from_uint8

    project = Project(tmp_path)
    folder = _hand_made(tmp_path / "samples" / "mine")
    result = eval_stage.run(_config(clip_file), project, samples_dir=folder, name="named")
    assert (tmp_path / "eval" / "named.json").is_file()
    clip = load_clip("shapes", str(clip_file))
    rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    pixels = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in rows])
    img = clip.embed_images(from_uint8(pixels)).double()
    txt = clip.embed_texts([r["prompt"] for r in rows]).double()
    cos = (img * txt).sum(-1).numpy()
    assert result["CLIP score (cosine, paper), all samples"] == pytest.approx(cos.mean(), abs=1e-5)
    assert result["CLIP score (x100 clamped, torchmetrics), all samples"] == pytest.approx(
        max(100 * cos.mean(), 0), abs=1e-3)  # torchmetrics clamps the mean, not each pair
    best = [cos[:4].max(), cos[4:].max()]
    assert result["CLIP score (cosine, paper), best of n"] == pytest.approx(np.mean(best), abs=1e-5)


def test_judge_metrics_best_of_n_uses_the_scores():
    prompts = ["a red circle"] * 3
    named = [{"shape": "circle", "colour": "red"}] * 3
    judged = [{"shape": "circle", "colour": "blue"}, {"shape": "circle", "colour": "red"},
              {"shape": "square", "colour": "red"}]
    m = judging.judge_metrics(prompts, named, judged, scores=[0.1, 0.9, 0.5])
    assert m["judge in-distribution, all samples: all named"] == pytest.approx(1 / 3)
    assert m["judge in-distribution, best of 3 by CLIP: all named"] == 1.0
    m = judging.judge_metrics(prompts, named, judged, scores=[0.1, 0.2, 0.5])
    assert m["judge in-distribution, best of 3 by CLIP: all named"] == 0.0
    assert m["judge in-distribution, best of 3 by CLIP: colour"] == 1.0
    assert judging.best_per_prompt(["a", "b", "a"], [1.0, 0.0, 1.0]) == [0, 1]  # first on ties
    assert judging.group_of({"shape": "circle", "colour": "blue"}) == "held-out"
    assert judging.group_of({"shape": "circle"}) == "in-distribution"


def test_shapes_fid_and_is_use_the_clip_and_say_so(tmp_path, clip_file, monkeypatch):
    project = Project(tmp_path)
    folder = _hand_made(tmp_path / "samples" / "mine")
    config = _config(clip_file, **{"eval.fid": True, "eval.inception_score": True, "eval.reference_count": 12})
    seen = []
    real_is = eval_stage.inception_score
    monkeypatch.setattr(eval_stage, "inception_score", lambda *a, **k: seen.append(k) or real_is(*a, **k))
    first = eval_stage.run(config, project, samples_dir=folder)
    assert seen and seen[0].get("rng") is not None  # rows come grouped by prompt: IS must shuffle them
    assert first["IS kind"].startswith("IS (tiny-CLIP zero-shot over 720 classes, not Inception)")
    assert first["IS kind"].endswith(", 1 split")  # 6 images: one split (one image a split would score 1 always)
    assert 1.0 <= first["IS"] <= 720
    assert "not Inception" in first["FID features"]
    assert first["FID reference images"] == 12 and first["FID"] > 0
    meta = tmp_path / "cache" / "shapes-reference" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    assert len(list((tmp_path / "cache" / "shapes-reference" / "images").glob("*.png"))) == 12
    second = eval_stage.run(config, project, samples_dir=folder)
    assert meta.stat().st_mtime_ns == stamp  # renders and statistics reused
    assert second["FID"] == pytest.approx(first["FID"], rel=1e-9)
    assert len(list((tmp_path / "cache").glob("fid-reference-*.npz"))) == 1


def test_inception_offline_is_one_user_error(tmp_path, clip_file, monkeypatch):
    from clipvqd import fid

    monkeypatch.setattr(fid, "CLEANFID_CACHE_DIR", tmp_path / "empty")
    monkeypatch.setattr(fid, "INCEPTION_URL", "https://inception-host.invalid/x.pt")
    folder = _hand_made(tmp_path / "samples" / "mine")
    config = _config(clip_file, **{"eval.fid": True, "eval.features": "inception", "eval.reference_path": str(folder)})
    with pytest.raises(UserError, match="eval.inception_weights"):
        eval_stage.run(config, Project(tmp_path), samples_dir=folder)


def test_folder_without_index_is_a_user_error(tmp_path, clip_file):
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match="index.jsonl"):
        eval_stage.run(_config(clip_file), Project(tmp_path), samples_dir=tmp_path / "bare")


def test_protocol_prompts(tmp_path, clip_file):
    project = Project(tmp_path)
    prompts, n = eval_stage.protocol_prompts(_config(clip_file, **{"eval.max_prompts": 2}), project)
    assert len(prompts) == 4 and n == 16
    assert judging.group_of(parse_prompt(prompts[-1])) == "held-out"
    assert judging.group_of(parse_prompt(prompts[0])) == "in-distribution"
    prompts, n = eval_stage.protocol_prompts(_config(clip_file, **{"eval.protocol": "ffhq64"}), project)
    assert len(prompts) == 64 and all(p.startswith("a photograph of ") for p in prompts)
    assert prompts[0] == "a photograph of a person with glasses"
    with pytest.raises(UserError, match="captions_file"):
        eval_stage.protocol_prompts(_config(clip_file, **{"eval.protocol": "coco"}), project)
    (tmp_path / "captions.txt").write_text("".join(f"caption number {i}\n" for i in range(50)))
    coco = _config(clip_file, **{"eval.protocol": "coco", "eval.captions_file": "captions.txt", "eval.caption_count": 10})
    first, n = eval_stage.protocol_prompts(coco, project)
    again, _ = eval_stage.protocol_prompts(coco, project)
    other, _ = eval_stage.protocol_prompts(coco.replace(**{"project.seed": 1}), project)
    assert n == 1 and first == again and len(set(first)) == 10 and first != other


def _fake_generate(calls):
    """A test double for sampling: renders a red circle, or a blue one when guidance < 2."""

    def generate(config, project, folder):
        calls.append((folder, config.sample.guidance, config.sample.truncation))
        colour = "red" if config.sample.guidance >= 2 else "blue"
        out = project.samples(folder)
        items = [("a red circle", A("circle", colour, "white", "large", pos), Jitter()) for pos in ("left", "right")]
        return _write_samples(out, items)

    return generate


def test_sweep_writes_json_table_and_plot(tmp_path, clip_file, monkeypatch):
    calls = []
    monkeypatch.setattr(eval_stage, "generate", _fake_generate(calls))
    project = Project(tmp_path)
    result = eval_stage.run(_config(clip_file), project,
                            sweeps=["guidance=1,3", "sample.truncation=0.8,1"], name="grid")
    assert result["grid points"] == 4
    assert [(g, t) for _, g, t in calls] == [(1.0, 0.8), (1.0, 1.0), (3.0, 0.8), (3.0, 1.0)]
    assert calls[0][0] == "eval-shapes-guidance-1-0-truncation-0-8"
    report = json.loads((tmp_path / "eval" / "grid-sweep.json").read_text())
    assert report["grid"] == {"guidance": ["1", "3"], "truncation": ["0.8", "1"]}
    assert report["plotted"] == "judge in-distribution, all samples: all named"
    accuracy = [p["metrics"][report["plotted"]] for p in report["points"]]
    assert accuracy == [0.0, 0.0, 1.0, 1.0]
    table = (tmp_path / "eval" / "grid-sweep.md").read_text().splitlines()
    assert table[2].startswith("| guidance | truncation |") and len(table) == 4 + 4
    assert table[4].startswith("| 1.0 | 0.8 |")
    with Image.open(tmp_path / "eval" / "grid-sweep.png") as im:
        # one legend entry per truncation and selection (all samples, best of n: reranking off and on),
        # and the image exactly as wide as a chart with those four entries
        names = [f"truncation={t}, {sel}" for t in (0.8, 1.0) for sel in ("all samples", "best of 2 by CLIP")]
        assert im.size == line_chart({name: [(0, 0.0)] for name in names}).size
        legend = np.asarray(im.convert("RGB"))[:, 540:]  # (the four lines coincide in the frame here)
    for colour in ([31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40]):
        assert (legend == colour).all(axis=-1).sum() > 10


def test_sweep_errors(tmp_path, clip_file):
    with pytest.raises(UserError, match="not a sample"):
        parse_sweeps(["alpha=1,2"])
    with pytest.raises(UserError, match="samples_per_prompt"):
        parse_sweeps(["n=1,2"])
    with pytest.raises(UserError, match="twice"):
        parse_sweeps(["guidance=1", "sample.guidance=2"])
    with pytest.raises(UserError, match="SAMPLES_DIR"):
        eval_stage.run(_config(clip_file), Project(tmp_path), samples_dir=tmp_path, sweeps=["guidance=1,2"])
    with pytest.raises(UserError, match="truncation"):
        eval_stage.run(_config(clip_file), Project(tmp_path), sweeps=["truncation=0.5,2"])


def test_plot_helpers():
    assert nice_ticks(0.12, 0.87) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1, 5) == [1, 2, 3, 4, 5]
    pixels = np.asarray(line_chart({"a": [(1, 0.5), (2, 0.7)], "b": [(1, 0.6), (2, float("nan"))]}))
    assert (pixels == [31, 119, 180]).all(axis=-1).sum() > 20  # each series colour is drawn
    assert (pixels == [255, 127, 14]).all(axis=-1).sum() > 10
    categorical = np.asarray(line_chart({"a": [("cfg", 0.5), ("base", 0.7)]}))
    assert (categorical == [31, 119, 180]).all(axis=-1).sum() > 20
    assert pixels.shape == (440, 720, 3)  # short legends: the size asked for
    long = np.asarray(line_chart({"judge in-distribution, all samples: all named": [(0, 0.3), (1, 0.5)]}))
    assert long.shape[1] > 720 and (long[:, -6:] == 255).all()  # widened: the legend's end is not cut off

    def line_rows(image):  # rows holding the first series' colour, inside the frame (not the legend)
        rows, cols = (np.asarray(image)[:, :540] == [31, 119, 180]).all(axis=-1).nonzero()
        return rows.min(), rows.max()

    flat = {"a": [(1, 0.5), (2, 0.5)]}
    low, high = line_rows(line_chart(flat, y_range=(0.0, 1.0)))  # frame rows 44..390: 0.5 sits at 217
    assert low >= 217 - 4 and high <= 217 + 4
    low, high = line_rows(line_chart({"a": [(1, 0.5), (2, 0.52)]}))  # without a range the data fill the axis
    assert high - low > 300


def test_sweep_plot_draws_reranking_off_and_on():
    judge_all, judge_best = "judge held-out, all samples: all named", "judge held-out, best of 16 by CLIP: all named"
    clip_all, clip_best = "CLIP score (cosine, paper), all samples", "CLIP score (cosine, paper), best of n"
    measured = {judge_all, judge_best, clip_all, clip_best, "CLIP score (x100 clamped, torchmetrics), best of n", "FID"}
    assert reranking_pair(judge_all, measured) == (judge_all, judge_best)
    assert reranking_pair(judge_best, measured) == (judge_all, judge_best)
    assert reranking_pair(clip_best, measured) == (clip_all, clip_best)  # not the torchmetrics variant
    assert reranking_pair("FID", measured) is None
    assert reranking_pair(judge_all, measured - {judge_best}) is None

    def colour_pixels(metrics_of_point):
        points = [{"values": {"steps": s}, "metrics": metrics_of_point(s)} for s in (10, 25, 100)]
        pixels = np.asarray(plot(points, judge_all, "t"))[:, :540]  # the frame, not the legend
        return [(pixels == c).all(axis=-1).sum() for c in ([31, 119, 180], [255, 127, 14])]

    both = colour_pixels(lambda s: {judge_all: 0.2 + s / 200, judge_best: 0.9})
    assert both[0] > 20 and both[1] > 20  # all samples in the first colour, the best of 16 in the second
    alone = colour_pixels(lambda s: {judge_all: 0.2 + s / 200})
    assert alone[0] > 20 and alone[1] == 0


class _FakeInception(torch.nn.Module):
    """A TorchScript stand-in with the parts of clean-fid's Inception file that eval uses."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
        self.output = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.output(self.layers(x))


def test_coco_protocol_with_a_local_inception_file(tmp_path, clip_file):
    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(weights))
    folder = _hand_made(tmp_path / "samples" / "coco-run")
    config = _config(clip_file, **{"eval.protocol": "coco", "eval.fid": True, "eval.inception_score": True,
                                   "eval.inception_weights": str(weights), "eval.reference_path": str(folder / "images"),
                                   "eval.features": "inception"})
    result = eval_stage.run(config, Project(tmp_path), samples_dir=folder)
    assert result["FID features"] == "clean-fid clean mode, Inception"
    assert abs(result["FID"]) < 1e-6  # the samples against themselves
    assert result["IS kind"] == "IS (Inception logits, no output bias), 1 split"  # 6 images: too few for 10 a split
    assert "judge in-distribution, all samples" not in result  # the judge is for shapes only
    config = config.replace(**{"eval.reference_path": ""})
    with pytest.raises(UserError, match="reference_path"):
        eval_stage.run(config, Project(tmp_path), samples_dir=folder)


def test_ffhq64_without_reference_measures_clip_only(tmp_path, clip_file):
    folder = _hand_made(tmp_path / "samples" / "faces")
    config = _config(clip_file, **{"eval.protocol": "ffhq64", "eval.fid": True, "eval.inception_score": True})
    result = eval_stage.run(config, Project(tmp_path), samples_dir=folder)
    assert "FID" not in result and "IS" not in result and "reference_path" in result["note 1"]
    assert "CLIP score (cosine, paper), best of n" in result


def test_generate_goes_through_the_sampling_code(tmp_path, clip_file, monkeypatch):
    from clipvqd.clip import load_clip
    from clipvqd.stages import sample

    seen = {}

    class FakeGenerator:
        def __init__(self, config, project):
            seen["n"], seen["name"] = config.sample.n, config.sample.name
            self.clip = load_clip("shapes", str(clip_file))

        def effective_guidance(self):
            return 1.0

    def fake_write(gen, jobs, out, guidance):
        seen["labels"] = [label for label, _ in jobs]
        seen["dims"] = {tuple(c.shape) for _, c in jobs}
        out.mkdir(parents=True)
        return [], []

    monkeypatch.setattr(sample, "Generator", FakeGenerator)
    monkeypatch.setattr(sample, "write_samples", fake_write)
    project = Project(tmp_path)
    stale = project.samples("eval-shapes") / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    config = _config(clip_file, **{"eval.max_prompts": 1, "eval.samples_per_prompt": 3})
    out = eval_stage.generate(config, project, "eval-shapes")
    assert out == project.samples("eval-shapes") and not stale.exists()
    assert seen["n"] == 3 and seen["name"] == "eval-shapes" and seen["dims"] == {(32,)}
    assert seen["labels"] == eval_stage.protocol_prompts(config, project)[0]
    (tmp_path / "caps.txt").write_text("a long caption that shares its first forty characters, one\n"
                                       "a long caption that shares its first forty characters, two\n")
    coco = _config(clip_file, **{"eval.protocol": "coco", "eval.captions_file": "caps.txt", "eval.caption_count": 2})
    eval_stage.generate(coco, project, "eval-coco")
    assert seen["n"] == 1
    assert sorted(seen["labels"]) == sorted((tmp_path / "caps.txt").read_text().splitlines())  # distinct: as they are
    coco = coco.replace(**{"eval.caption_count": 5})  # more draws than captions: some caption repeats
    eval_stage.generate(coco, project, "eval-coco")
    assert sorted(label.split(" ", 1)[0] for label in seen["labels"]) == [f"#{i}" for i in range(5)]  # numbered apart


def test_repeated_captions_stay_separate_prompts(tmp_path, clip_file):
    """eval numbers a caption drawn twice ('#0 x', '#1 x'): two prompts of one sample each, scored against 'x'."""
    project = Project(tmp_path)
    red = ("circle", "red", "white", "large", "center")
    folder = _write_samples(tmp_path / "samples" / "coco", [
        ("#0 a red circle", A(*red), Jitter()),
        ("#1 a red circle", A("square", "blue", "white", "large", "center"), Jitter()),
        ("#2 a red square", A(*red), Jitter()),
    ])
    result = eval_stage.run(_config(clip_file), project, samples_dir=folder)
    assert result["prompts"] == 3 and result["samples per prompt"] == 1
    # best of 1 is every sample: the same judge numbers as all samples (merged, '#0'/'#1' would keep one)
    m = json.loads((tmp_path / "eval" / "coco.json").read_text())["metrics"]
    assert m["judge in-distribution, best of 1 by CLIP: images"] == 3
    assert m["judge in-distribution, best of 1 by CLIP: all named"] == pytest.approx(1 / 3)
    plain = _write_samples(tmp_path / "samples" / "plain", [
        ("a red circle", A(*red), Jitter()), ("a red circle", A("square", "blue", "white", "large", "center"), Jitter()),
        ("a red square", A(*red), Jitter())])
    same = eval_stage.run(_config(clip_file), project, samples_dir=plain)
    assert same["CLIP score (cosine, paper), all samples"] == pytest.approx(
        result["CLIP score (cosine, paper), all samples"], abs=1e-6)  # the number is not part of the text


@pytest.mark.slow
def test_end_to_end_on_a_tiny_trained_project(tiny_project):
    """Train the tiny project's models for a few steps, then `eval` generates and measures for real."""
    from clipvqd.config import load_config
    from clipvqd.stages import finetune_cfg, tokenize, train_diffusion, train_vq

    config = load_config(tiny_project)
    project = Project.from_file(tiny_project)
    for stage in (train_vq, tokenize, train_diffusion, finetune_cfg):
        stage.run(config, project)
    config = config.replace(**{"eval.max_prompts": 1, "eval.samples_per_prompt": 2, "eval.reference_count": 8})
    result = eval_stage.run(config, project)
    assert result["images"] == 4 and result["model (as sampled)"] == "diffusion-cfg"
    assert result["IS kind"].startswith("IS (tiny-CLIP zero-shot") and np.isfinite(result["FID"])
    assert "judge held-out, all samples" in result and "judge in-distribution, best of 2 by CLIP" in result
    rows = [json.loads(line) for line in (project.samples("eval-shapes") / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in eval_stage.protocol_prompts(config, project)[0] for _ in range(2)]
    assert json.loads((project.eval_dir / "shapes.json").read_text())["metrics"]["images"] == 4
    sweep = eval_stage.run(config, project, sweeps=["guidance=1,2"], name="g")
    assert sweep["grid points"] == 2
    assert all((project.eval_dir / f"g-sweep.{ext}").is_file() for ext in ("json", "md", "png"))
    # sampling again into a folder replaces it: no image of the first run stays beside the new index
    from clipvqd.stages import sample

    for n in (3, 2):
        sample.run(config.replace(**{"sample.n": n, "sample.name": "again"}), project, prompt="a red circle")
    assert len(list((project.samples("again") / "images").glob("*.png"))) == 2
    # prompts without an ASCII letter get folders of their own
    for prompt in ("赤い円", "青い四角"):
        sample.run(config.replace(**{"sample.n": 1}), project, prompt=prompt)
    assert len({p.name for p in project.samples("x").parent.iterdir() if p.name.startswith("p-")}) == 2


def test_max_prompts_spreads_through_the_set():
    from clipvqd.evaluation.protocols import _spread

    assert _spread(list(range(10)), 3) == [0, 3, 6]
    assert _spread(list(range(4)), 9) == [0, 1, 2, 3]
    from clipvqd.shapes.prompts import in_distribution_prompts

    shapes = {named["shape"] for _, named in _spread(in_distribution_prompts(), 6)}
    assert len(shapes) >= 3  # a short demo still sees several shapes


def test_sample_file_names_keep_every_prompt_apart(tmp_path):
    """Prompts alike in their first 40 characters (and a prompt given twice) must not overwrite each other's images."""
    from clipvqd.stages.sample import file_stems, write_samples

    class FakeGenerator:  # image i of a job is filled with the job's colour, its seed in one pixel
        config = Config().replace(**{"sample.n": 2, "sample.batch_size": 3})
        device, model_kind = torch.device("cpu"), "diffusion"

        class clip:
            @staticmethod
            def embed_images(images):
                return torch.ones(len(images), 3)

        @staticmethod
        def images(cond, seeds, steps, guidance, truncation):
            out = cond[:, :, None, None].expand(-1, 3, 8, 8).clone()
            out[:, 0, 0, 0] = torch.tensor(seeds, dtype=out.dtype) / 10
            return out

    long = "a long prompt that shares its first forty characters, "
    jobs = [(long + "one", torch.tensor([-1.0, 0.0, 0.0])), (long + "two", torch.tensor([0.0, 1.0, 0.0])),
            ("a red circle", torch.tensor([1.0, 0.0, 1.0])), ("a red circle", torch.tensor([1.0, 0.0, 1.0]))]
    assert file_stems(["a red circle", "a blue square"]) == ["a-red-circle", "a-blue-square"]  # unchanged when unique
    rows, sheets = write_samples(FakeGenerator(), jobs, tmp_path / "s", 1.0)
    assert len(rows) == 8 and len({r["file"] for r in rows}) == 8 and len(sheets) == 4 == len(set(sheets))
    for r in rows:
        colour = dict(jobs)[r["prompt"]]
        pixel = np.asarray(Image.open(tmp_path / "s" / r["file"]).convert("RGB"))[4, 4]
        assert np.allclose(pixel, (colour.numpy() + 1) * 127.5, atol=1), r  # the image of its own prompt
    index = [json.loads(line) for line in (tmp_path / "s" / "index.jsonl").read_text().splitlines()]
    assert index == rows


def test_rerank_scores_a_numbered_label_by_its_text(tmp_path, clip_file):
    from clipvqd.stages import rerank

    project = Project(tmp_path)
    circle = A("circle", "red", "white", "large", "center")
    numbered = _write_samples(tmp_path / "samples" / "numbered", [("#3 a red circle", circle, Jitter())])
    plain = _write_samples(tmp_path / "samples" / "plain", [("a red circle", circle, Jitter())])
    config = _config(clip_file)
    first = rerank.run(config, project, numbered)
    a, b = first["mean CLIP score, all samples"], rerank.run(config, project, plain)["mean CLIP score, all samples"]
    assert a == pytest.approx(b, abs=1e-6)
    assert first["kept per prompt"] == 1  # one sample a prompt: rerank.keep (4) cannot keep more


def test_eval_says_what_it_skipped_and_when_the_protocol_does_not_fit(tmp_path, clip_file):
    project = Project(tmp_path)
    circle = A("circle", "red", "white", "large", "center")
    folder = _write_samples(tmp_path / "samples" / "img", [("image:ref.png", circle, Jitter())] * 2)
    eval_stage.run(_config(clip_file, **{"data.source": "folder", "data.path": "pics"}), project, samples_dir=folder)
    notes = json.loads((tmp_path / "eval" / "img.json").read_text())["notes"]
    assert any("CLIP score skipped" in n for n in notes)  # no text to score the images against
    assert any("eval.protocol = shapes measures the shapes world" in n for n in notes)


def test_a_named_metric_that_cannot_be_computed_is_an_error_before_sampling(tmp_path, clip_file):
    """`eval --fid` on ffhq64 without real images, `--clip` on image-conditioned samples: one error line
    (named metrics), where eval without flags goes on with a note."""
    project = Project(tmp_path)
    circle = A("circle", "red", "white", "large", "center")
    folder = _write_samples(tmp_path / "samples" / "img", [("image:ref.png", circle, Jitter())] * 2)
    with pytest.raises(UserError, match="--clip: these samples were made from reference images"):
        eval_stage.run(_config(clip_file, **{"eval.clip_score": True}), project, samples_dir=folder, strict=True)
    ffhq = _config(clip_file, **{"eval.protocol": "ffhq64", "eval.fid": True, "eval.judge": False})
    with pytest.raises(UserError, match="--fid: the ffhq64 protocol measures it only with eval.reference_path"):
        eval_stage.run(ffhq, project, strict=True)  # raised before any sampling: no model exists here
    assert eval_stage.unavailable(_config(clip_file, **{"eval.judge": True, "eval.protocol": "coco"})) == {
        "--judge": "the judge reads the shapes world only (eval.protocol = shapes)"}
    assert eval_stage.unavailable(_config(clip_file)) == {}  # the shapes defaults: everything computable
