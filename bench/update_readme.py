"""Copy the latest tables from bench/results/*.md into the README's benchmark section."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def main():
    parts = []
    for name in ("quality", "speed", "pipeline"):
        p = os.path.join(ROOT, "bench", "results", f"{name}.md")
        if os.path.exists(p):
            with open(p) as f:
                text = re.sub(r"^<!--.*?-->\n", "", f.read())
            parts.append(f"#### {name} (`bench/{name}.py`)\n\n" + text.strip() + "\n")
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        s = f.read()
    body = START + "\n" + "\n".join(parts) + END
    s = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: body, s, flags=re.S)
    with open(readme, "w") as f:
        f.write(s)
    print(f"updated {readme} with {len(parts)} benchmark reports")


if __name__ == "__main__":
    main()
