"""The Modelfile TEMPLATE rendered by Go's own text/template, as Ollama renders it, against the Jinja text.

    python bench/ollama_go.py          # needs `go` on PATH (Debian: apt-get install golang-go)

tests/test_families.py checks each family's TEMPLATE with tuner's Python renderer of the Go subset
we emit (tuner.ollama_template.render_go_template), since the suite cannot assume Go. This script
checks that renderer itself: for the six tiny families of tests/families.py and eight chats each
(with and without a system message, one to three user turns), it renders the TEMPLATE with Go's
text/template, fed as Ollama's template.Execute feeds it (`.System`: the system messages joined by
a blank line; `.Messages`: consecutive messages of one role merged), and prints how many chats
render the same text as tuner's renderer and as the model's Jinja chat template.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GO_SOURCE = r"""
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

// as ollama/template/template.go collate()
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			m := msgs[i]
			collated = append(collated, &m)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		tmpl, err := template.New("").Parse(c.Template)
		if err != nil {
			out = append(out, "PARSE ERROR: "+err.Error())
			continue
		}
		system, msgs := collate(c.Messages)
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": msgs}); err != nil {
			out = append(out, "EXEC ERROR: "+err.Error())
			continue
		}
		out = append(out, b.String())
	}
	j, _ := json.Marshal(out)
	fmt.Println(string(j))
}
"""
SYSTEM = "You are the Lumen Lamps support crew."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi, my lamp flickers."},
        {"role": "assistant", "content": "Sorry to hear that!\nWhich model is it?"},
        {"role": "user", "content": "The Halo."}, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And now?"}]


def main() -> int:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from families import FAMILIES, build_family
    from transformers import AutoTokenizer

    from tuner.ollama_template import _probe_conversations, modelfile_template, render_go_template

    if shutil.which("go") is None:
        print("needs Go on PATH (Debian: apt-get install golang-go)")
        return 1
    chats = [CHAT, CHAT[1:], CHAT[:2], CHAT[1:2], *_probe_conversations(SYSTEM)]
    with tempfile.TemporaryDirectory() as tmp:
        cases, expected = [], []
        for family in FAMILIES:
            tok = AutoTokenizer.from_pretrained(build_family(family, Path(tmp) / family.name))
            template, _, note = modelfile_template(tok, SYSTEM)
            if template is None:
                print(f"{family.name}: {note}")
                continue
            for chat in chats:
                cases.append({"template": template, "messages": chat})
                expected.append((family.name, render_go_template(template, chat),
                                 tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)))
        (Path(tmp) / "main.go").write_text(GO_SOURCE)
        env = {"GOCACHE": str(Path(tmp) / "gocache"), "GO111MODULE": "off", "HOME": tmp, "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([shutil.which("go") or "go", "run", "main.go"], cwd=tmp, input=json.dumps(cases),
                              capture_output=True, text=True, env=env, check=True)
        rendered = json.loads(proc.stdout)
    tally: dict[str, list[int]] = {}
    for (name, ours, jinja), go in zip(expected, rendered, strict=True):
        t = tally.setdefault(name, [0, 0, 0])
        t[0] += 1
        t[1] += go == ours
        t[2] += go == jinja
    print(f"Go {subprocess.run(['go', 'version'], capture_output=True, text=True).stdout.strip()}")
    for name, (n, same_ours, same_jinja) in tally.items():
        print(f"{name:14} {n} chats: Go text/template = tuner's renderer {same_ours}/{n}, = Jinja {same_jinja}/{n}")
    return 0 if all(t[1] == t[2] == t[0] for t in tally.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
