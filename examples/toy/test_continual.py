"""Fast checks of continual.py's pieces that need no training (the experiment itself: continual.py --quick)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
import continual  # noqa: E402
import world  # noqa: E402


def test_the_second_concept_is_a_fair_new_concept():
    """[W]'s images show their shapes (visible colours), its evaluation and validation prompts are pairs its images
    never show, and it is further than the held-out margin from [V] and every named style."""
    visible = set(world.visible_colours(world.HELD_OUT_2))
    assert {c for _, c in world.FINETUNE_2 + world.NEW_PROMPTS_2 + world.VAL_PROMPTS_2} <= visible
    seen = set(world.FINETUNE_2)
    assert not seen & set(world.NEW_PROMPTS_2) and not (seen | set(world.NEW_PROMPTS_2)) & set(world.VAL_PROMPTS_2)
    stats = lambda s: world.style_stats(world.render_background(s))
    w = stats(world.HELD_OUT_2)
    assert min(world.style_distance(w, stats(s)) for s in [world.HELD_OUT, *world.NAMED.values()]) > \
        world.HELD_OUT_MARGIN
    assert world.TRIGGER_2 != world.TRIGGER


def test_write_concept_set_writes_the_finetune_set_for_the_first_concept(tmp_path):
    """write_concept_set is write_finetune_set for any concept: for [V] the same files, byte for byte."""
    a = world.write_finetune_set(tmp_path / "a")
    b = world.write_concept_set(tmp_path / "b", world.HELD_OUT, world.FINETUNE, world.TRIGGER)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 12
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_stage_two_keeps_a_prompts_and_old_prompts_but_never_an_evaluated_one(tmp_path):
    """The anchor's prompts: A's 6 training captions and reproduce's KEEP; none is an evaluation prompt."""
    keep = continual.write_keep_ab(tmp_path / "k.txt").read_text().splitlines()
    assert len(keep) == len(world.FINETUNE) + len(continual.rp.KEEP)
    evaluated = ([world.caption(s, c, world.TRIGGER) for s, c in world.NEW_PROMPTS]
                 + [world.caption(s, c, world.TRIGGER_2) for s, c in world.NEW_PROMPTS_2]
                 + [world.caption(s, c) for s, c in continual.rp.OLD_UNNAMED]
                 + [continual.rp.named_caption(*p) for p in continual.rp.OLD_NAMED])
    assert not set(keep) & set(evaluated)
    assert continual.fill(["--init-lora", "{a}", "{keep_ab}"], a="A", keep_ab="K") == ["--init-lora", "A", "K"]


def test_the_predictions_are_scored_on_the_means():
    """A made-up result where every prediction holds, then one where A is kept without an anchor (P2 fails). Two
    seeds in two cells: on the seeds' max P3 would fail, on their min P5."""
    base = dict(leak_w=1.1)
    m = lambda w, v, leak, sharp=1.0, agree=0.05: dict(w_style=w, v_style=v, leak_w=leak, sharpness=sharp,
                                                       agree_4_32=agree)
    good = {"sft": {n: [m(0.3, 0.9, 0.5, agree=0.06)] for n in (50, 150)},
            "dopsd": {n: [m(0.42, 0.8, 0.5)] for n in (50, 150)},
            "dopsd-preserve": {n: [m(0.43, 0.33, 1.0), m(0.43, 0.41, 1.0)] for n in (50, 150)},   # mean 0.37
            "stacked": {n: [m(0.5, 0.35, 1.0), m(0.5, 0.65, 1.0)] for n in (50, 150)}}           # mean 0.5
    held = [ok for _, ok, _ in continual.predictions(good, (50, 150), 150, base, 0.41, 0.35)]
    assert held == [True] * 5
    good["dopsd"] = {n: [m(0.42, 0.36, 0.5)] for n in (50, 150)}
    held = [ok for _, ok, _ in continual.predictions(good, (50, 150), 150, base, 0.41, 0.35)]
    assert held == [True, False, True, True, True]
