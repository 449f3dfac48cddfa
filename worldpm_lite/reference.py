"""Reference data: the two conversations of WorldPM's README and the scores the bf16 WorldPM-72B base
model gives them (published by Qwen), for `selfcheck` and the demo."""

# The README's recipe: apply_chat_template(conversation, tokenize=False, add_generation_prompt=False),
# encode(text, add_special_tokens=False), the model's first output is the score.
README_PAIR = [
    [{"role": "system", "content": ""},
     {"role": "user", "content": "Tips for better sleep?"},
     {"role": "assistant", "content": "Three key tips for better sleep:\n1. Set a consistent bedtime and wake-up "
      "schedule\n2. Avoid screens 1 hour before bed\n3. Keep your bedroom cool and dark\n\nStart with these habits "
      "and you should notice improvement within a week."}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "Tips for better sleep?"},
     {"role": "assistant", "content": "just try sleeping earlier or take some pills if u cant sleep lol. maybe watch "
      "tv until u get tired idk"}],
]
README_LABELS = ("helpful three-tip answer", "'just try sleeping earlier or take some pills...'")
PUBLISHED_72B = [0.6298332214355469, -1.6425328254699707]
SELFCHECK_ATOL = 0.06  # bf16 on other hardware moves the scores by a few hundredths


def published_text() -> str:
    """The published scores as the demo prints them: '+0.630 vs -1.643'."""
    return " vs ".join(f"{s:+.3f}" for s in PUBLISHED_72B)


def matches_published(scores: list[float], atol: float = SELFCHECK_ATOL) -> tuple[bool, list[float]]:
    """Both README scores within atol of WorldPM-72B's published ones, in the same order."""
    diffs = [abs(a - b) for a, b in zip(scores, PUBLISHED_72B)]
    return max(diffs) <= atol and scores[0] > scores[1], diffs
