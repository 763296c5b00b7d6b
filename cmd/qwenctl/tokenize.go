package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/qwenfleet/qwenfleet/pkg/tokenizer"
)

// tokenizerFlags are --model DIR | --tokenizer FILE.
type tokenizerFlags struct{ model, file *string }

func addTokenizerFlags(fs interface {
	String(string, string, string) *string
}) tokenizerFlags {
	return tokenizerFlags{
		model: fs.String("model", "", "model directory holding tokenizer.json"),
		file:  fs.String("tokenizer", "", "a tokenizer.json file"),
	}
}

func (f tokenizerFlags) load() (*tokenizer.Tokenizer, error) {
	switch {
	case *f.model != "" && *f.file != "":
		return nil, usagef("give --model or --tokenizer, not both")
	case *f.model != "":
		return tokenizer.Load(filepath.Join(*f.model, "tokenizer.json"))
	case *f.file != "":
		return tokenizer.Load(*f.file)
	}
	return nil, usagef("--model DIR or --tokenizer FILE is required")
}

func runTokenize(args []string) error {
	fs := newFlags("tokenize", "(--model DIR | --tokenizer FILE) (--jsonl | --text TEXT) [--chat]")
	tf := addTokenizerFlags(fs)
	jsonl := fs.Bool("jsonl", false, `read lines {"text": "..."} on stdin, write {"ids": [...]} per line, in order`)
	text := fs.String("text", "", "tokenize this text")
	chat := fs.Bool("chat", false, "with --text: wrap it as one user message in the ChatML chat template, with the generation prompt")
	if err := parse(fs, args); err != nil {
		return err
	}
	textSet := false
	fs.Visit(func(f *flag.Flag) { textSet = textSet || f.Name == "text" })
	if *jsonl == textSet {
		return usagef("give exactly one of --jsonl and --text")
	}
	tk, err := tf.load()
	if err != nil {
		return err
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	if textSet {
		var ids []int32
		if *chat {
			if ids, err = tk.EncodeChat([]tokenizer.Message{{Role: "user", Content: *text}}, true); err != nil {
				return fmt.Errorf("--text: %w", err)
			}
		} else {
			ids = tk.Encode(*text)
		}
		return enc.Encode(idsJSON{nonNil(ids)})
	}
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	for line := 1; ; line++ {
		raw, err := in.ReadBytes('\n')
		if len(bytes.TrimSpace(raw)) > 0 {
			var req struct {
				Text *string `json:"text"`
			}
			if jerr := json.Unmarshal(raw, &req); jerr != nil {
				return fmt.Errorf("stdin line %d: %v", line, jerr)
			}
			if req.Text == nil {
				return fmt.Errorf(`stdin line %d: no "text" field`, line)
			}
			if err := enc.Encode(idsJSON{nonNil(tk.Encode(*req.Text))}); err != nil {
				return err
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("stdin: %w", err)
		}
	}
}

type idsJSON struct {
	IDs []int32 `json:"ids"`
}

func nonNil(ids []int32) []int32 {
	if ids == nil {
		return []int32{}
	}
	return ids
}

func runDetokenize(args []string) error {
	fs := newFlags("detokenize", "(--model DIR | --tokenizer FILE) --ids 1,2,3 [--skip-special] [--json]")
	tf := addTokenizerFlags(fs)
	idsFlag := fs.String("ids", "", "comma-separated token ids")
	skip := fs.Bool("skip-special", false, "leave special tokens (<|im_end|>, ...) out")
	asJSON := fs.Bool("json", false, `print {"text": "..."} instead of the raw text`)
	if err := parse(fs, args); err != nil {
		return err
	}
	ids, err := parseIDs("ids", *idsFlag)
	if err != nil {
		return err
	}
	tk, err := tf.load()
	if err != nil {
		return err
	}
	text, err := tk.Decode(ids, *skip)
	if err != nil {
		return usagef("--ids: %v", err)
	}
	if *asJSON {
		return json.NewEncoder(os.Stdout).Encode(map[string]string{"text": text})
	}
	_, err = fmt.Println(text)
	return err
}
