"""The book's instruction data (chapter 7): its format, prompt template, split, batches and answers.

The data is a JSON list of {"instruction", "input", "output"} (the book's instruction-data.json: 1,100
examples, Alpaca style). Each becomes one training text: PREAMBLE, "### Instruction:", the input under
"### Input:" when there is one, RESPONSE_HEADER, the output and <|endoftext|> (format_prompt). The split
is the book's, in the file's order: 85% train, 10% test, 5% validation (935 / 110 / 55). Batches are
padded as the book's custom_collate_fn pads them (collate). finetune_instructions.py trains on this;
`evaluate.py instruct` writes a model's answers to the test split.
"""

import json
import os
import urllib.error
import urllib.request

import torch

import gpt
import training
from data import file_sha256

BOOK_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                 "instruction-data.json")
BOOK_DATA_PATH = os.path.join("datasets", "instruction-data.json")  # the book's file, once downloaded
DOWNLOAD_TIMEOUT = 30           # seconds
TRAIN_FRACTION = 0.85           # the book's split: train 85%, test 10%, validation the rest
TEST_FRACTION = 0.10
IGNORE_INDEX = -100             # targets the loss skips (torch's cross_entropy default)
MAX_NEW_TOKENS = 256            # the book's answer length limit
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
FIELDS = ("instruction", "input", "output")
BOOK_FORMAT = "the book's format is a JSON list of {instruction, input, output}"


class InstructionError(Exception):
    """Instruction data that cannot be used (the message says what and what to do)."""


def download_book_data(path=BOOK_DATA_PATH, url=BOOK_DATA_URL):
    """The book's instruction-data.json, fetched once into `path` (written whole or not at all)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(tmp, "wb") as f:
            f.write(response.read())
        os.replace(tmp, path)
    except (OSError, urllib.error.URLError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise InstructionError(f"could not download the book's instruction data from {url} "
                               f"({getattr(e, 'reason', e)}); on a machine online save that file and pass it "
                               "with --data FILE") from None
    return path


def load_examples(path=None):
    """(examples, path, sha256 of the file). path None: the book's file, downloaded on first use."""
    if path is None:
        path = BOOK_DATA_PATH if os.path.isfile(BOOK_DATA_PATH) else download_book_data()
    if not os.path.isfile(path):
        raise InstructionError(f"{path} does not exist; pass the book's instruction-data.json (or a file in its "
                               "format) with --data FILE, or leave --data out to download it")
    try:
        with open(path, encoding="utf-8") as f:
            examples = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InstructionError(f"{path} is not JSON ({e}); {BOOK_FORMAT}") from None
    if not isinstance(examples, list):
        raise InstructionError(f"{path} holds a JSON {type(examples).__name__}, not a list; {BOOK_FORMAT}")
    for i, entry in enumerate(examples):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), str) for k in FIELDS):
            raise InstructionError(f"{path} item {i} is not an object with the text fields instruction, input and "
                                   f"output; {BOOK_FORMAT} (input may be \"\")")
    return examples, path, file_sha256(path)


def split_examples(examples, where="the data"):
    """{"train", "val", "test"}: the book's split, in the file's order (85% / 5% / 10%)."""
    n = len(examples)
    n_train, n_test = int(n * TRAIN_FRACTION), int(n * TEST_FRACTION)
    splits = {"train": examples[:n_train], "test": examples[n_train:n_train + n_test],
              "val": examples[n_train + n_test:]}
    if any(not part for part in splits.values()):
        raise InstructionError(f"{where} has {n} examples; the book's 85/10/5 split needs at least 10 so that "
                               "train, test and validation each get one")
    return splits


def format_prompt(entry):
    """The book's format_input: the preamble, the instruction, and the input when there is one."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


def encode_example(entry, tokenizer):
    """(token ids of prompt + response header + output, how many of them are the prompt and header).
    The two parts are encoded apart so that the prompt's length is exact; the header ends in a newline,
    which GPT-2's tokenizer never merges with the text after it, so the ids are the whole text's."""
    prompt = tokenizer.encode_ordinary(format_prompt(entry) + RESPONSE_HEADER)
    return prompt + tokenizer.encode_ordinary(entry["output"]), len(prompt)


def collate(encoded, mask_prompt=False, max_length=None, device="cpu"):
    """(inputs, targets), each (batch, longest example) int64, as the book's custom_collate_fn builds
    them: one <|endoftext|> ends each example (so the model learns to stop); past it inputs are padded
    with <|endoftext|> and targets with -100, which the loss skips. With mask_prompt the prompt's
    targets are -100 too, so only the response is learned (the book's exercise 7.2). Cut to max_length."""
    width = max(len(tokens) for tokens, _ in encoded)
    inputs = torch.full((len(encoded), width), gpt.EOT_TOKEN, dtype=torch.long)
    targets = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (tokens, prompt_length) in enumerate(encoded):
        sequence = torch.tensor(tokens + [gpt.EOT_TOKEN])
        inputs[row, :len(tokens)] = sequence[:-1]
        targets[row, :len(tokens)] = sequence[1:]
        if mask_prompt:
            targets[row, :prompt_length - 1] = IGNORE_INDEX  # position t predicts token t + 1
    return inputs[:, :max_length].to(device), targets[:, :max_length].to(device)


@torch.inference_mode()
def examples_loss(model, encoded, batch_size, mask_prompt, max_length, device):
    """Mean cross-entropy per target token over all the examples, in batches, under the precision
    every validation loss here uses (training.evaluation_precision), read once at the end."""
    precision = training.evaluation_precision(device)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(encoded), batch_size):
        inputs, targets = collate(encoded[start:start + batch_size], mask_prompt, max_length, device)
        n = (targets != IGNORE_INDEX).sum()
        with precision.autocast():
            total += model(inputs, targets=targets).float() * n
        count += n
    model.train(was_training)
    return (total / count.clamp(min=1)).item()


@torch.no_grad()
def answer(model, entry, tokenizer, device, max_new_tokens=MAX_NEW_TOKENS):
    """The model's greedy answer, got as the book gets it: continue the prompt (without the response
    header), stop at <|endoftext|>, keep the new text with any "### Response:" taken out."""
    prompt = tokenizer.encode_ordinary(format_prompt(entry))
    idx = torch.tensor([prompt], device=device)
    with training.evaluation_precision(device).autocast():
        out = gpt.generate(model, idx, max_new_tokens, context_size=model.cfg["context_length"],
                           eos_id=gpt.EOT_TOKEN)
    new = [t for t in out[0, len(prompt):].tolist() if t < tokenizer.n_vocab and t != gpt.EOT_TOKEN]
    return tokenizer.decode(new).replace("### Response:", "").strip()


def reference_loss(model, entry, tokenizer, max_length, device):
    """(mean cross-entropy of the reference output's tokens and its <|endoftext|>, given the prompt;
    how many tokens). A score with no judge: lower means the model finds the right answer likelier."""
    encoded = [encode_example(entry, tokenizer)]
    _, targets = collate(encoded, mask_prompt=True, max_length=max_length)
    n = int((targets != IGNORE_INDEX).sum())
    if n == 0:  # the prompt alone fills the context
        return None, 0
    return examples_loss(model, encoded, 1, True, max_length, device), n
