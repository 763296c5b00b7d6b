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
}

// APIKeys is a loaded API keys file.
type APIKeys struct {
	keys []APIKey
	sums [][]byte
}

// Len is the number of keys.
func (k *APIKeys) Len() int { return len(k.keys) }

// Lookup returns the entry of key. It compares the key's SHA-256 with every
// entry in constant time (crypto/subtle), so its time depends only on the
// number of entries.
func (k *APIKeys) Lookup(key string) (APIKey, bool) {
	if k == nil {
		return APIKey{}, false
	}
	sum := sha256.Sum256([]byte(key))
	found := -1
	for i, s := range k.sums {
		if subtle.ConstantTimeCompare(sum[:], s) == 1 {
			found = i
		}
	}
	if found < 0 {
		return APIKey{}, false
	}
	return k.keys[found], true
}

func validAPIRole(role string) bool { return role == APIRoleUser || role == APIRoleAdmin }

// LoadAPIKeys reads an API keys file: JSON lines of {"sha256", "name",
// "role"}; blank lines are skipped. Errors name the file and line: a
// malformed line, a bad hash or role, an empty name, a repeated name or hash.
func LoadAPIKeys(file string) (*APIKeys, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, errorf("%v", err)
	}
	return parseAPIKeys(file, b)
}

func parseAPIKeys(file string, b []byte) (*APIKeys, error) {
	ks := &APIKeys{}
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
