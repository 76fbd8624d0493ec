"""Continual learning (Learning without Forgetting): --classes keeps some classes' samples, --kd-classes restricts the
distillation term to the old classes' logits, and the README's recipe runs as written (one epoch each)."""

import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from console import run_cli

from kdcache.cache import open_cache
from kdcache.data import load_dataset
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss

README = Path(__file__).resolve().parent.parent / "README.md"
OLD = [0, 1, 2, 3, 4]


def recipe_commands() -> list[list[str]]:
    """The README's continual-learning commands (the bash block holding --kd-classes), continuation lines joined,
    comments dropped, at one epoch and one view."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S) if "--kd-classes" in b)
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines if line.strip()]
    tiny = {"--epochs": "1", "--views": "1"}
    return [[tiny.get(before, word) for before, word in zip([""] + words, words)] for words in commands]


def test_the_readme_continual_recipe_runs_and_reports_old_and_new_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = recipe_commands()
    assert [words[:2] for words in commands][:4] == [["kdcache", "train-teacher"], ["kdcache", "dump-teacher"],
                                                     ["kdcache", "distill"], ["kdcache", "distill"]]
    printed = []
    for words in commands:
        code, out, err = run_cli(words[1:], capsys)
        assert code == 0, (words, err)
        printed.append(out)
    old_test = len(load_dataset("digits", split="test", classes="0-4").labels)
    new_test = len(load_dataset("digits", split="test", classes="5-9").labels)
    evaluated = [re.search(r"(\S+)/model.pt .* on digits test, (\d+) samples( among the logits of classes "
                           r"0,1,2,3,4)?: top-1 ([\d.]+)", text).groups() for text in printed if "top-1" in text]
    assert [(run.split("/")[-1], int(samples), bool(among)) for run, samples, among, _ in evaluated] == [
        ("old", old_test, False), ("fine-tune", old_test, True), ("fine-tune", old_test, False),
        ("fine-tune", new_test, False), ("lwf", old_test, True), ("lwf", old_test, False), ("lwf", new_test, False)]
    with open_cache(tmp_path / "caches" / "lwf-old-on-new.zarr") as cache:  # the old model over the new classes
        assert cache.spec.dataset["classes"] == [5, 6, 7, 8, 9] and set(cache.labels().tolist()) == {5, 6, 7, 8, 9}
    assert "kd_classes: 0-4" in (tmp_path / "runs" / "lwf" / "lwf" / "config.yaml").read_text()
    code, _, err = run_cli(["distill", "--cache", "caches/lwf-old-on-new.zarr", "--classes", "0-4"], capsys)
    assert code == 2 and "classes" in err and "[5, 6, 7, 8, 9]" in err and "[0, 1, 2, 3, 4]" in err
    code, _, err = run_cli(["dump-teacher", "--checkpoint", "runs/lwf/fine-tune", "--views-from",
                            "caches/lwf-old-on-new.zarr", "--out", "again.zarr"], capsys)  # the same samples' views
    with open_cache("caches/lwf-old-on-new.zarr") as cache, open_cache("again.zarr") as again:
        assert code == 0 and again.spec.dataset == cache.spec.dataset
        assert (again.aug_params(0) == cache.aug_params(0)).all()


def test_kd_classes_distil_the_old_classes_softmax_alone_and_cross_entropy_reads_every_class():
    torch.manual_seed(0)
    student = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    teacher, labels = torch.randn(6, 10, dtype=torch.float64), torch.tensor([5, 6, 7, 8, 9, 5])
    loss = get_loss("kd", kd_classes=tuple(OLD), temperature=2.0, ce_weight=1.0, distill_weight=0.25)
    terms = loss.compute(student, teacher, labels, epoch=1)
    # the paper's term, transcribed: T² · Σ_old p_t (log p_t - log p_s), softmax over the old classes only
    p_t = (teacher[:, OLD] / 2).softmax(-1)
    expected = 0.25 * 4 * (p_t * (p_t.log() - (student[:, OLD] / 2).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(terms["kd"], expected)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(student, labels))
    (gradient,) = torch.autograd.grad(terms["kd"], student)
    assert gradient[:, 5:].abs().max() == 0 and gradient[:, :5].abs().max() > 0  # the new classes' logits are free
    with pytest.raises(KdcacheError, match="--kd-classes: restricts the kd loss's logits .* use --loss kd"):
        get_loss("dkd", kd_classes=(0, 1))
    with pytest.raises(KdcacheError, match="--kd-classes names class 12 but the logits have 10 classes"):
        get_loss("kd", kd_classes=(0, 12)).compute(student, teacher, labels, epoch=1)


def test_classes_keep_some_classes_samples_and_a_bad_list_is_one_line(tmp_path, capsys, digits_cache):
    full, kept = load_dataset("digits", split="test"), load_dataset("digits", split="test", classes="0-2,7")
    assert set(kept.labels.tolist()) == {0, 1, 2, 7} and kept.num_classes == 10 and kept.mean == full.mean
    assert len(kept.labels) == int(torch.isin(full.labels, torch.tensor([0, 1, 2, 7])).sum())
    assert kept.describe()["classes"] == [0, 1, 2, 7] and "classes" not in full.describe()
    for bad in ("5-2", "a", "0-10", ""):
        code, _, err = run_cli(["train-teacher", "--classes", bad, "--epochs", "1", "--out", tmp_path / "t"], capsys)
        assert code == 2 and f"--classes: expected classes such as 0-4 or 0,2,5, each from 0 to 9; got {bad!r}" in err
    code, _, err = run_cli(["distill", "--cache", "c.zarr", "--kd-classes", "0-x"], capsys)
    assert code == 2 and "--kd-classes: expected classes such as 0-4" in err
    code, _, err = run_cli(["distill", "--cache", digits_cache, "--loss", "kd", "--kd-classes", "0-12", "--out",
                            tmp_path / "runs"], capsys)  # the data's classes are known once it is loaded
    assert code == 2 and "--kd-classes: expected classes such as 0-4 or 0,2,5, each from 0 to 9; got '0-12'" in err
    assert not (tmp_path / "runs").exists()


def test_eval_within_classes_answers_among_those_classes_logits_alone(tmp_path, capsys):
    from kdcache.data import normalize
    from kdcache.models import create_model, save_checkpoint
    from kdcache.stages.evaluate import evaluate_model

    torch.manual_seed(1)
    model = create_model("resnet8", num_classes=10).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    test = load_dataset("digits", split="test", classes="2,4,9")
    with torch.no_grad():
        logits = model(normalize(test.images, test.mean, test.std))
    found = evaluate_model(tmp_path / "m.pt", "resnet8", "digits", classes="2,4,9", within_classes=True, device="cpu")
    place = {2: 0, 4: 1, 9: 2}
    expected = (logits[:, [2, 4, 9]].argmax(-1) == torch.tensor([place[int(y)] for y in test.labels])).double().mean()
    assert found.among == [2, 4, 9] and found.top5 is None and abs(found.top1 - float(expected)) < 1e-9
    everywhere = evaluate_model(tmp_path / "m.pt", "resnet8", "digits", classes="2,4,9", device="cpu")
    assert abs(everywhere.top1 - float((logits.argmax(-1) == test.labels).double().mean())) < 1e-9
    code, _, err = run_cli(["eval", tmp_path / "m.pt", "--model", "resnet8", "--dataset", "digits",
                            "--within-classes"], capsys)
    assert code == 2 and "eval --within-classes: answers among some classes' logits, and digits test holds every" in err
