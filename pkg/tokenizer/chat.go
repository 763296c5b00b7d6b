package tokenizer

import (
	"fmt"
	"strings"
)

// Message is one turn of a conversation.
type Message struct {
	Role    string `json:"role"` // system, user or assistant
	Content string `json:"content"`
}

// DefaultSystemPrompt is what Qwen2-Instruct's template inserts when the
// conversation does not start with a system message.
const DefaultSystemPrompt = "You are a helpful assistant."

// RenderChat writes messages in Qwen2-Instruct's ChatML, exactly as its chat
// template does:
//
//	<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n   (when the first message is not system)
//	<|im_start|>{role}\n{content}<|im_end|>\n                      (each message)
//	<|im_start|>assistant\n                                         (addGenerationPrompt)
func RenderChat(messages []Message, addGenerationPrompt bool) string {
	var b strings.Builder
	if len(messages) == 0 || messages[0].Role != "system" {
		b.WriteString("<|im_start|>system\n" + DefaultSystemPrompt + "<|im_end|>\n")
	}
	for _, m := range messages {
		b.WriteString("<|im_start|>" + m.Role + "\n" + m.Content + "<|im_end|>\n")
	}
	if addGenerationPrompt {
		b.WriteString("<|im_start|>assistant\n")
	}
	return b.String()
}

// ValidateChat checks roles (system, user, assistant; system only first) and
// that no role or content holds ChatML control text, which would let a user
// forge turns. The error names the message.
func ValidateChat(messages []Message) error {
	if len(messages) == 0 {
		return fmt.Errorf("chat: no messages")
	}
	for i, m := range messages {
		switch m.Role {
		case "user", "assistant":
		case "system":
			if i != 0 {
				return fmt.Errorf("chat: messages[%d]: a system message must come first", i)
			}
		default:
			return fmt.Errorf("chat: messages[%d]: role %q is not system, user or assistant", i, m.Role)
		}
		for _, ctl := range []string{"<|im_start|>", "<|im_end|>", "<|endoftext|>"} {
			if strings.Contains(m.Content, ctl) {
				return fmt.Errorf("chat: messages[%d]: content contains the control token %s", i, ctl)
			}
		}
	}
	return nil
}

// EncodeChat validates and renders messages and encodes the result (the
// ChatML control tokens become their ids).
func (t *Tokenizer) EncodeChat(messages []Message, addGenerationPrompt bool) ([]int32, error) {
	if err := ValidateChat(messages); err != nil {
		return nil, err
	}
	return t.Encode(RenderChat(messages, addGenerationPrompt)), nil
}

// StopIDs are the ids that end a generation: <|im_end|> (end of an
// Instruct turn) and <|endoftext|> (end of a document, the base models' EOS),
// those the tokenizer has.
func (t *Tokenizer) StopIDs() []int32 {
	var ids []int32
	for _, s := range []string{"<|im_end|>", "<|endoftext|>"} {
		if id, ok := t.ID(s); ok {
			ids = append(ids, id)
		}
	}
	return ids
}
