"""Every image, every compressor, every retention ratio, every model family: the model answers, or refuses
with one of the CLI's user errors (issue 32). Never another exception.

The images are generated (tests/strategies.py: 1 px to 100,000 px a side, any aspect ratio, every colour
mode and format the loader reads, decoded by it); the models are the shipped one and a tiny random model
of every family of `config.FAMILIES` on a generated tile geometry (tests/families.py). An answer with no
visual token is allowed only where the method's rounding keeps none: r P < 1 (int(P r), round(P r) and
the like are 0 only there). The same for the picture of what was kept (`minillava.apps.visualize`,
which the demo page shows) and for a batch, whose rows answer as each question alone.
"""

import re

import pytest
from hypothesis import strategies as st

from minillava import generate as gen
from minillava.apps.visualize import kept_picture
from minillava.batch import generate_batch
from minillava.compression import compressors, needs, place, tower_schedule
from minillava.generate import USER_ERRORS
from minillava.schedule import build as build_schedule
from minillava.tokenizer import PromptError, Tokenizer
from minillava.trust import ConfigError
from tests import families
from tests.families import SHIPPED, models
from tests.strategies import Geometry, budgets, check, images, noise, ratios

QUESTION = "What is in the picture?"
# the issue's images: a 127 x 3188 PNG and a 1 x 100000 one ended in ZeroDivisionError (layout.grid_share)
ISSUE_SIZES = [(127, 3188), (1, 100_000), (9, 3000)]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)  # the random models' vocabulary (tests/tiny.py)


@pytest.fixture(scope="module")
def shipped():
    return gen.load(SHIPPED)


# found by these tests: PruMerge+ on tiles of one patch (P = 1) keeps no token and took the argmax of
# an empty slot axis (globalcom2/peers.py `_prumerge`)
ONE_PATCH = dict(which=("llava-next", Geometry(side=1, patch=1, grids=((1, 1),), max_tiles=None), 3),
                 image=noise((1, 1), 0), method="prumerge+", ratio=1.0)


def refused_rightly(model, method: str, error: Exception, ratio: float, picture: bool = False):
    """A user error the inputs call for: one line, and either a method this model cannot run (a [CLS]
    method on a tower without [CLS], refused by `needs`; a decoder method on too few decoder layers,
    refused by its schedule; a tower method at an r its tower cannot merge to, refused by its tower
    schedule; in a picture, a tower method, whose merged tokens have no cell to draw) or a prompt longer
    than the context."""
    message = str(error)
    assert "\n" not in message and message, message
    if isinstance(error, ConfigError):
        if picture and place(method) == "tower":
            return
        with pytest.raises(ConfigError):
            needs(model, method)
            build_schedule(method, 0, 1, 1.0, model.cfg.text.num_hidden_layers)
            tower_schedule(model, method, ratio)
    else:
        assert isinstance(error, PromptError) and "context" in message, message


def kept_nothing_only_by_rounding(model, method: str, ratio: float, after: int):
    P = model.cfg.token_side ** 2
    assert after >= 0
    if after == 0:
        assert method != "none" and ratio * P < 1, (method, ratio, P)


def answer_case(resolve, which, image, method, ratio):
    model, tokenizer = resolve(which)
    try:
        result = gen.generate(model, tokenizer, image, QUESTION, method, ratio, max_new_tokens=1)
    except USER_ERRORS as e:
        refused_rightly(model, method, e, ratio)
        return
    assert len(result.token_ids) == 1
    assert result.visual_tokens["before"] >= model.cfg.token_side ** 2
    kept_nothing_only_by_rounding(model, method, ratio, result.visual_tokens["after"])


@pytest.fixture(scope="module")
def resolve(shipped, tokenizer):
    def get(which):
        name, geometry, layers = which
        return shipped if name == SHIPPED else (families.model(name, geometry, layers), tokenizer)
    return get


def found(method: str) -> list[dict]:
    """The explicit examples of `method`: the issue's images, and what the properties found."""
    issue = [dict(which=(SHIPPED, None, 4), image=noise(size, 0), ratio=0.25) for size in ISSUE_SIZES]
    return issue + ([{k: v for k, v in ONE_PATCH.items() if k != "method"}] if method == ONE_PATCH["method"] else [])


@pytest.mark.parametrize("method", compressors())
@budgets(8, campaign=100)
def test_every_image_answers_or_is_refused(n, resolve, method):
    check(lambda which, image, ratio: answer_case(resolve, which, image, method, ratio), n,
          explicit=found(method), which=models(), image=images(max_pixels=1 << 18), ratio=ratios())


def picture_case(resolve, which, image, method, ratio):
    model, tokenizer = resolve(which)
    try:
        picture = kept_picture(model, image, method, ratio, tokenizer=tokenizer, prompt=QUESTION)
    except USER_ERRORS as e:
        refused_rightly(model, method, e, ratio, picture=True)
        return
    assert picture.image.width > 0 and picture.image.height > 0
    assert picture.before >= model.cfg.token_side ** 2
    kept_nothing_only_by_rounding(model, method, ratio, picture.after)


@pytest.mark.parametrize("method", compressors())
@budgets(2, campaign=30)
def test_every_picture_of_what_was_kept_is_drawn_or_refused(n, resolve, method):
    explicit = [{k: v for k, v in ONE_PATCH.items() if k != "method"}] if method == ONE_PATCH["method"] else []
    check(lambda which, image, ratio: picture_case(resolve, which, image, method, ratio), n,
          explicit=explicit, which=models(max_grid=3), image=images(max_pixels=1 << 16), ratio=ratios())


def batch_case(resolve, which, pictures, method, ratio):
    model, tokenizer = resolve(which)
    items = [(image, QUESTION) for image in pictures]
    try:
        rows = generate_batch(model, tokenizer, items, method, ratio, max_new_tokens=2, return_exceptions=True)
    except USER_ERRORS as e:  # a method this model cannot run fails the whole batch, as it fails each question
        with pytest.raises(type(e), match="^" + re.escape(str(e)) + "$"):
            gen.generate(model, tokenizer, pictures[0], QUESTION, method, ratio, max_new_tokens=2)
        return
    for (image, _), row in zip(items, rows):
        try:
            alone = gen.generate(model, tokenizer, image, QUESTION, method, ratio, max_new_tokens=2)
        except USER_ERRORS as e:
            assert type(row) is type(e) and str(row) == str(e)
            continue
        assert not isinstance(row, Exception), row
        assert row.token_ids == alone.token_ids and row.visual_tokens == alone.visual_tokens


@pytest.mark.parametrize("method", compressors())
@budgets(2, campaign=30)
def test_a_batch_answers_as_each_question_alone(n, resolve, method):
    check(lambda which, pictures, ratio: batch_case(resolve, which, pictures, method, ratio), n,
          which=models(), pictures=st.lists(images(max_pixels=1 << 16), min_size=2, max_size=3), ratio=ratios())
