package security

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"strings"
	"sync"
	"time"
)

// API key roles.
const (
	APIRoleUser  = "user"
	APIRoleAdmin = "admin"
)

// APIKeyPrefix starts every key AddAPIKey makes.
const APIKeyPrefix = "qf_"

// APIKey is one entry of an API keys file.
type APIKey struct {
	SHA256 string `json:"sha256"` // hex SHA-256 of the key
	Name   string `json:"name"`
	Role   string `json:"role"` // APIRoleUser or APIRoleAdmin
	// MaxStreams bounds the key's concurrent streams; 0 (or absent) means
	// the server's default.
	MaxStreams int `json:"max_streams,omitempty"`
}

// APIKeys is an API keys file that follows its changes: Lookup re-reads the
// file when its size, modification time or inode changed, at most once a
// second. A file that no longer loads (or is gone) leaves the keys in use
// and Err reports it. It is safe for concurrent use.
type APIKeys struct {
	file string

	// interval is the least time between two checks of the file (a
	// second; tests shorten it).
	interval time.Duration

	mu      sync.Mutex
	checked time.Time
	stamp   os.FileInfo
	set     *keySet
	lastErr error
}

// keySet is one loaded version of the file; it is never changed.
type keySet struct {
	keys []APIKey
	sums [][]byte
}

// Len is the number of keys in use.
func (k *APIKeys) Len() int { return len(k.current().keys) }

// File is the keys file.
func (k *APIKeys) File() string { return k.file }

// Err is the error of the last failed re-read (the previous keys stay in
// use), or nil when the keys in use are the file's.
func (k *APIKeys) Err() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.lastErr
}

// Lookup returns the entry of key. It compares the key's SHA-256 with every
// entry in constant time (crypto/subtle), so its time depends only on the
// number of entries.
func (k *APIKeys) Lookup(key string) (APIKey, bool) {
	if k == nil {
		return APIKey{}, false
	}
	set := k.current()
	sum := sha256.Sum256([]byte(key))
	found := -1
	for i, s := range set.sums {
		if subtle.ConstantTimeCompare(sum[:], s) == 1 {
			found = i
		}
	}
	if found < 0 {
		return APIKey{}, false
	}
	return set.keys[found], true
}

// current returns the keys in use, re-reading the file first when it
// changed and the last check is at least k.interval old.
func (k *APIKeys) current() *keySet {
	k.mu.Lock()
	defer k.mu.Unlock()
	now := time.Now()
	if now.Sub(k.checked) < k.interval {
		return k.set
	}
	k.checked = now
	fi, err := os.Stat(k.file)
	if err != nil {
		k.lastErr = errorf("%v", err)
		return k.set
	}
	if k.stamp != nil && fi.Size() == k.stamp.Size() && fi.ModTime().Equal(k.stamp.ModTime()) && os.SameFile(fi, k.stamp) {
		return k.set
	}
	b, err := os.ReadFile(k.file)
	if err != nil {
		k.lastErr = errorf("%v", err)
		return k.set
	}
	set, err := parseAPIKeys(k.file, b)
	if err != nil {
		// Keep the keys in use; the stamp stays old so the next check
		// tries again.
		k.lastErr = err
		return k.set
	}
	k.stamp, k.set, k.lastErr = fi, set, nil
	return k.set
}

func validAPIRole(role string) bool { return role == APIRoleUser || role == APIRoleAdmin }

// LoadAPIKeys reads an API keys file: JSON lines of {"sha256", "name",
// "role", optional "max_streams"}; blank lines are skipped. Errors name the
// file and line: a malformed line, an unknown field, a bad hash or role, an
// empty name, a negative max_streams, a repeated name or hash. The keys
// follow the file's later changes (see APIKeys).
func LoadAPIKeys(file string) (*APIKeys, error) {
	fi, err := os.Stat(file)
	if err != nil {
		return nil, errorf("%v", err)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, errorf("%v", err)
	}
	set, err := parseAPIKeys(file, b)
	if err != nil {
		return nil, err
	}
	return &APIKeys{file: file, interval: time.Second, checked: time.Now(), stamp: fi, set: set}, nil
}

func parseAPIKeys(file string, b []byte) (*keySet, error) {
	ks := &keySet{}
	names := map[string]int{}
	hashes := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		var k APIKey
		dec := json.NewDecoder(strings.NewReader(text))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&k); err != nil {
			return nil, errorf("%s:%d: %v", file, line, err)
		}
		sum, err := hex.DecodeString(k.SHA256)
		if err != nil || len(sum) != sha256.Size {
			return nil, errorf("%s:%d: sha256 is not 64 hex digits", file, line)
		}
		k.SHA256 = strings.ToLower(k.SHA256)
		if k.Name == "" {
			return nil, errorf("%s:%d: no name", file, line)
		}
		if !validAPIRole(k.Role) {
			return nil, errorf("%s:%d: role %q is not user or admin", file, line, k.Role)
		}
		if k.MaxStreams < 0 {
			return nil, errorf("%s:%d: max_streams %d is negative", file, line, k.MaxStreams)
		}
		if prev, ok := names[k.Name]; ok {
			return nil, errorf("%s:%d: name %q is already on line %d", file, line, k.Name, prev)
		}
		if prev, ok := hashes[k.SHA256]; ok {
			return nil, errorf("%s:%d: the key of line %d again", file, line, prev)
		}
		names[k.Name], hashes[k.SHA256] = line, line
		ks.keys = append(ks.keys, k)
		ks.sums = append(ks.sums, sum)
	}
	if err := sc.Err(); err != nil {
		return nil, errorf("%s:%d: %v", file, line+1, err)
	}
	return ks, nil
}

// AddAPIKey makes a new key ("qf_" and the base64url of 32 random bytes),
// appends its hash, name and role to file (created 0600 when missing, and
// set to 0600) and returns the key: the only time it is seen. It refuses a
// bad role, an empty name, a name already in the file and a file that does
// not load.
func AddAPIKey(file, name, role string) (string, error) {
	if !validAPIRole(role) {
		return "", errorf("role %q is not user or admin", role)
	}
	if strings.TrimSpace(name) == "" || strings.ContainsAny(name, "\n\r") {
		return "", errorf("an API key needs a one-line name")
	}
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return "", errorf("%v", err)
	}
	defer f.Close()
	if err := f.Chmod(0o600); err != nil {
		return "", errorf("%v", err)
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		return "", errorf("%v", err)
	}
	ks, err := parseAPIKeys(file, buf.Bytes())
	if err != nil {
		return "", err
	}
	for _, k := range ks.keys {
		if k.Name == name {
			return "", errorf("%s: an API key named %q exists", file, name)
		}
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", errorf("generating a key: %v", err)
	}
	key := APIKeyPrefix + base64.RawURLEncoding.EncodeToString(raw[:])
	sum := sha256.Sum256([]byte(key))
	line, err := json.Marshal(APIKey{SHA256: hex.EncodeToString(sum[:]), Name: name, Role: role})
	if err != nil {
		return "", errorf("%v", err)
	}
	if n := buf.Len(); n > 0 && buf.Bytes()[n-1] != '\n' {
		line = append([]byte{'\n'}, line...)
	}
	line = append(line, '\n')
	if _, err := f.Write(line); err != nil { // the offset is at the end after the read
		return "", errorf("%v", err)
	}
	if err := f.Sync(); err != nil {
		return "", errorf("%v", err)
	}
	if err := f.Close(); err != nil && !errors.Is(err, fs.ErrClosed) {
		return "", errorf("%v", err)
	}
	return key, nil
}
