"""Giles Thomas's RTX 3090 run in numbers, each written here once: the defaults of prepare_datasets.py
and train.py, and what the measuring and evaluating scripts compare with. The run: "Writing an LLM from
scratch, part 28 -- training a base model from scratch on an RTX 3090" (gilesthomas.com), the book's
GPT-2 small (untied head, no qkv bias, dropout 0.1) on FineWeb for 44 hours; the figures are his.
"""

CONTEXT_LENGTH = 1024           # GPT-2's context
BATCH_SIZE = 6                  # sequences per step: what fit his RTX 3090's 24 GiB
LR = 4e-4                       # the book's AdamW settings, which he kept
WEIGHT_DECAY = 0.1
PARAMETERS = 163_009_536

# Validation: he timed evaluation batches and picked 3,200 of 6 x 1,024 (about 5 minutes a check).
VAL_BATCHES = 3_200
VAL_TOKENS = VAL_BATCHES * BATCH_SIZE * CONTEXT_LENGTH              # 19,660,800
# Training: Chinchilla's ~20 tokens per parameter is 3,260,190,720 tokens = 530,630 batches; he
# picked "a round number" above that, 534,200 batches.
TRAIN_BATCHES = 534_200
TRAIN_TOKENS = TRAIN_BATCHES * BATCH_SIZE * CONTEXT_LENGTH          # 3,282,124,800

TOKENS_PER_SECOND = 19_921      # training throughput on the RTX 3090 (fp16 autocast, TF32)

# His second yardstick (same post): the book's chapter 7 instruction fine-tuning (Alpaca-style data,
# 1,100 examples), the 110 test answers scored 0-100 by an LLM, one answer per prompt, averaged.
# Best fine-tuning epochs by validation loss: OpenAI GPT-2 small 2, his FineWeb model 10, his
# FineWeb-Edu model 5, his FineWeb-Edu model trained twice as long 8.
JUDGED_BY_GPT_5_1 = {"OpenAI GPT-2 small": 20.39, "OpenAI GPT-2 medium": 38.41, "his FineWeb model": 16.14,
                     "his FineWeb-Edu model": 15.18, "his FineWeb-Edu model, trained twice as long": 16.62}
JUDGED_BY_LLAMA_3 = {"OpenAI GPT-2 small": 35.50, "his FineWeb model": 29.35}

# HellaSwag acc_norm on all 10,042 validation items as llm.c's dev/data/hellaswag.py scores it (the
# ending with the lowest mean loss per token wins), published in that file's docstring.
HELLASWAG_ACC_NORM_LLMC = {"OpenAI GPT-2 small": 0.2955, "OpenAI GPT-2 XL": 0.4893}

# --eval-set: the windows others publish losses on, with their own method (offset into the val split,
# batch, context, batches; fp16 autocast on CUDA, as evaluation_precision does), and what was published.
# Use them on a dataset made from that source's tokens (prepare_datasets.py --from-tokens).
EVAL_SETS = {
    "gpjt-test": {
        "offset": 50_000_000, "batch_size": 6, "context_length": 1024, "batches": 3_200,
        "about": "Giles Thomas's test loss: 3,200 batches of 6 x 1,024 from token 50,000,000 of "
                 "gpjt/fineweb-gpt2-tokens validation.safetensors",
        "published": "published by Giles Thomas (parts 29-32, 2025): OpenAI GPT-2 small 3.500, GPT-2 medium 3.231; "
                     "his RTX 3090 run 3.944; his 8 x A100 baseline 3.692; his helpful changes stacked 3.578"},
    "llmc-val": {
        "offset": 0, "batch_size": 8, "context_length": 1024, "batches": 1_280,
        "about": "the GPT-2 speedrun's validation: the first 10,485,760 tokens of llm.c's fineweb_val_000000.bin",
        "published": "the GPT-2 (124M) speedrun target of llm.c and modded-nanogpt (2024-25): val loss 3.28"},
}
