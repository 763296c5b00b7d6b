package cluster

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// memberlistLinesPerMinute bounds memberlist's lines at Info and above
// (its errors repeat every probe while a member is unreachable).
const memberlistLinesPerMinute = 10

// memberlistLog is memberlist's log output (one Write a line, "[LEVEL]
// memberlist: text"): a message or stream that fails decryption, from a
// member with another key or none, goes to refusals (listener "gossip",
// once per remote host); other lines go to log at their level, at most
// memberlistLinesPerMinute a minute above Debug.
type memberlistLog struct {
	log      *slog.Logger
	refusals *security.Refusals
	now      func() time.Time

	mu      sync.Mutex
	window  time.Time // start of the minute counted in
	lines   int       // lines above Debug logged in it
	dropped int       // lines above Debug not logged in it
}

func newMemberlistLog(log *slog.Logger) *memberlistLog {
	return &memberlistLog{log: log, refusals: security.NewRefusals(log), now: time.Now}
}

func (w *memberlistLog) Write(p []byte) (int, error) {
	level, text := parseMemberlistLine(string(p))
	if remote, reason, ok := gossipRefusal(text); ok {
		w.refusals.Refuse("gossip", remote, reason)
		return len(p), nil
	}
	if level == slog.LevelDebug {
		if w.log.Enabled(context.Background(), slog.LevelDebug) {
			w.log.Debug("memberlist: " + text)
		}
		return len(p), nil
	}
	w.mu.Lock()
	now := w.now()
	dropped := 0
	if now.Sub(w.window) >= time.Minute {
		dropped = w.dropped
		w.window, w.lines, w.dropped = now, 0, 0
	}
	ok := w.lines < memberlistLinesPerMinute
	if ok {
		w.lines++
	} else {
		w.dropped++
	}
	w.mu.Unlock()
	if dropped > 0 {
		w.log.Warn("memberlist: more lines than are logged a minute", "not_logged", dropped, "limit_per_minute", memberlistLinesPerMinute)
	}
	if ok {
		w.log.Log(context.Background(), level, "memberlist: "+text)
	}
	return len(p), nil
}

// parseMemberlistLine splits "[LEVEL] memberlist: text" into a slog level
// (ERR and WARN: Warn, INFO: Info, DEBUG and anything unmarked: Debug)
// and the text.
func parseMemberlistLine(line string) (slog.Level, string) {
	line = strings.TrimSpace(line)
	level := slog.LevelDebug
	if strings.HasPrefix(line, "[") {
		if i := strings.IndexByte(line, ']'); i > 0 {
			switch line[1:i] {
			case "ERR", "ERROR", "WARN":
				level = slog.LevelWarn
			case "INFO":
				level = slog.LevelInfo
			}
			line = strings.TrimSpace(line[i+1:])
		}
	} else if strings.HasPrefix(line, "Err:") {
		level = slog.LevelWarn
	}
	return level, strings.TrimPrefix(line, "memberlist: ")
}

// gossipRefusal recognises a received message or stream that memberlist
// dropped for its encryption or label ("Decrypt packet failed: ...
// from=ADDR", "failed to receive: no installed keys could decrypt the
// message from=ADDR", "... remote state is not encrypted from=ADDR"),
// returning the sender's address and the reason.
func gossipRefusal(text string) (remote, reason string, ok bool) {
	i := strings.LastIndex(text, " from=")
	if i < 0 {
		return "", "", false
	}
	lower := strings.ToLower(text[:i])
	if !strings.Contains(lower, "crypt") && !strings.Contains(lower, "unacceptable label") {
		return "", "", false
	}
	remote = strings.TrimSpace(text[i+len(" from="):])
	if remote == "" || remote == "<unknown address>" {
		remote = "unknown"
	}
	return remote, text[:i], true
}
