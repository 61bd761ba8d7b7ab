"""The alignment stages (SFT, reward models, GRPO) and the data they consume.

Kept import-free on purpose: `import alignment.tasks` must not pull in torch or transformers.
"""
