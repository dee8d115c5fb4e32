import torch

from trainer.clip.tokenizer import get_tokenizer, tokenize


def test_known_ids():
    assert tokenize("a diagram", 8).tolist() == [[49406, 320, 22697, 49407, 0, 0, 0, 0]]
    out = tokenize(["a dog", "a cat"])
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert out[:, :4].tolist() == [[49406, 320, 1929, 49407], [49406, 320, 2368, 49407]]
    assert out[:, 4:].abs().sum() == 0


def test_vocab_and_specials():
    tok = get_tokenizer()
    assert tok.vocab_size == 49408
    assert (tok.sot_token, tok.eot_token) == (49406, 49407)


def test_cleaning_is_case_and_whitespace_insensitive():
    assert torch.equal(tokenize("A   Dog\n"), tokenize("a dog"))
    assert torch.equal(tokenize("fish &amp; chips"), tokenize("fish & chips"))


def test_truncation_keeps_end_token():
    out = tokenize("a very long caption " * 50, context_length=16)
    assert out.shape == (1, 16)
    assert out[0, 0] == 49406 and out[0, -1] == 49407
    assert (out[0] == 49407).sum() == 1 and (out[0] == 0).sum() == 0
    assert out[0].argmax() == 15  # the text tower reads features at the end token


def test_unicode_and_emoji_do_not_crash():
    out = tokenize(["😀🐶 日本語のテキスト café naïve", "", "\x00\u200b ...!!!"], context_length=32)
    assert out.shape == (3, 32)
    assert out[1, :2].tolist() == [49406, 49407]
    assert (out < 49408).all() and (out >= 0).all()
    assert get_tokenizer().decode(out[0]).startswith("😀🐶")


def test_decode_round_trip():
    tok = get_tokenizer()
    assert tok.decode(tokenize("a photo of a red apple.")[0]) == "a photo of a red apple ."
