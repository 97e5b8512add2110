"""Test utility: a schema-valid trace payload whose texts are HTML/JS (shared/docs/robustness.md item 11).

Token texts, top-k texts, the prompt and the model name all come from files and tokenizers written by
strangers; the app must show them as text. Every string here would set `window.__pwned` (or leave a
marked element) if a page rendered it as HTML or followed it as a link.
"""

from __future__ import annotations

HOSTILE = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2">',
    '<svg onload="window.__pwned=3"></svg>',
    '<a href="javascript:window.__pwned=4">click</a>',
    "[md link](javascript:window.__pwned=5)",
    '<iframe src="javascript:window.__pwned=6"></iframe>',
    '<b id="pwn-bold">bold</b>',
]
SCRIPT, IMG = HOSTILE[0], HOSTILE[1]
LABEL = "<i id=pwn-label>label</i>"

# Run in the page: what a rendered payload would have left behind (empty list: nothing).
INJECTED_JS = """() => {
  const bad = [];
  if (window.__pwned !== undefined) bad.push('window.__pwned = ' + window.__pwned);
  for (const s of document.querySelectorAll('script')) if (s.textContent.includes('__pwned')) bad.push('script');
  for (const e of document.querySelectorAll('*')) {
    for (const a of e.attributes) {
      if (a.name.startsWith('on') && a.value.includes('__pwned')) bad.push(e.tagName + ' ' + a.name);
      if (/^\\s*javascript:/i.test(a.value)) bad.push(e.tagName + ' ' + a.name + '=' + a.value);
    }
  }
  for (const sel of ['#pwn-bold', '#pwn-label', 'img[src="x"]', 'iframe[src^="javascript"]'])
    if (document.querySelector(sel)) bad.push(sel);
  return bad;
}"""


def hostile_payload(model, n_tokens: int = 8) -> dict:
    """A real payload of `model` over a few tokens, its texts replaced by HOSTILE (still schema-valid)."""
    from contracts import validate_payload
    from traces.tracing import trace_payload

    payload = trace_payload(model, list(range(3, 3 + n_tokens)), prompt="x", top_k=7)
    payload["prompt"] = " ".join(HOSTILE)
    payload["token_texts"] = [HOSTILE[i % len(HOSTILE)] for i in range(n_tokens)]
    for i, entry in enumerate(payload["logits"]["top_k"]):
        entry["text"] = HOSTILE[i % len(HOSTILE)]
    payload["model"]["name"] = IMG
    validate_payload(payload)
    return payload
