package framework

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Secret is key material that must not appear in any file: the RMK or a
// Shamir share.
type Secret struct {
	Name  string
	Value []byte
	// Home, if set, is the one file that holds the secret by design (a
	// safe's PIN or passphrase file): finding it there is no leak.
	Home string
}

// Encoding is one way a secret might have been written out.
type Encoding struct {
	Name  string
	Bytes []byte
}

// Encodings returns the forms of v the scan looks for: the raw bytes; hex
// in lower and upper case; standard and URL-safe base64 at each of the three
// alignments v can have inside a longer encoded blob (only the characters
// that depend on v alone, so v embedded in a larger base64 message, such as
// a protobuf or a JSON []byte field, is found too); and Go's %v of a byte
// slice ("[12 255 ...]", without the brackets).
func Encodings(v []byte) []Encoding {
	out := []Encoding{
		{"raw", bytes.Clone(v)},
		{"hex", []byte(hex.EncodeToString(v))},
		{"HEX", []byte(strings.ToUpper(hex.EncodeToString(v)))},
		{"decimal %v", []byte(strings.Trim(fmt.Sprint(v), "[]"))},
	}
	for shift := range 3 {
		for _, enc := range []struct {
			name string
			e    *base64.Encoding
		}{{"base64", base64.StdEncoding}, {"base64url", base64.URLEncoding}} {
			buf := append(make([]byte, shift), v...)
			s := enc.e.EncodeToString(buf)
			// Character j carries bits [6j, 6j+6); keep those inside v's
			// bits [8*shift, 8*(shift+len(v))).
			from := (8*shift + 5) / 6
			to := 8 * (shift + len(v)) / 6
			out = append(out, Encoding{fmt.Sprintf("%s@%d", enc.name, shift), []byte(s[from:to])})
		}
	}
	return out
}

// Finding is a secret found in a file.
type Finding struct {
	Path, Secret, Encoding string
}

func (f Finding) String() string {
	return fmt.Sprintf("%s holds %s (%s)", f.Path, f.Secret, f.Encoding)
}

// ScanStats says how much a scan read.
type ScanStats struct {
	Files int
	Bytes int64
}

// minSecretLen is the shortest secret Scan looks for; every encoding of a
// secret is at least as long.
const minSecretLen = 16

// pattern is one encoding of one secret.
type pattern struct {
	secret string
	enc    Encoding
	home   string // the secret's own file, where it is no finding
}

// sameFile reports whether paths a and b name the same file.
func sameFile(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// patternIndex finds many patterns in one pass over a file: patterns are
// indexed by their first minSecretLen bytes, each offset of the file is
// looked up once, and only the patterns whose prefix is there are compared
// in full. A scan for a thousand region keys in megabytes of Raft log stays
// linear in the size of the files.
type patternIndex struct {
	patterns []pattern
	byPrefix map[string][]int
}

func newPatternIndex(patterns []pattern) *patternIndex {
	x := &patternIndex{patterns: patterns, byPrefix: map[string][]int{}}
	for i, p := range patterns {
		prefix := string(p.enc.Bytes[:minSecretLen])
		x.byPrefix[prefix] = append(x.byPrefix[prefix], i)
	}
	return x
}

// find returns the indices of the patterns data contains, each once.
func (x *patternIndex) find(data []byte) []int {
	var out []int
	seen := map[int]bool{}
	for off := 0; off+minSecretLen <= len(data); off++ {
		ids, ok := x.byPrefix[string(data[off:off+minSecretLen])]
		if !ok {
			continue
		}
		for _, id := range ids {
			if !seen[id] && bytes.HasPrefix(data[off:], x.patterns[id].enc.Bytes) {
				seen[id] = true
				out = append(out, id)
			}
		}
	}
	return out
}

// Scan reads every regular file under the roots and reports each secret
// found in any of its Encodings. Symbolic links are not followed.
func Scan(roots []string, secrets []Secret) ([]Finding, ScanStats, error) {
	var patterns []pattern
	for _, s := range secrets {
		if len(s.Value) < minSecretLen {
			return nil, ScanStats{}, fmt.Errorf("framework: secret %s is %d bytes; too short to scan for without false hits", s.Name, len(s.Value))
		}
		for _, e := range Encodings(s.Value) {
			if len(e.Bytes) < minSecretLen {
				return nil, ScanStats{}, fmt.Errorf("framework: secret %s: encoding %s is %d bytes, shorter than %d", s.Name, e.Name, len(e.Bytes), minSecretLen)
			}
			patterns = append(patterns, pattern{s.Name, e, s.Home})
		}
	}
	index := newPatternIndex(patterns)
	var found []Finding
	var stats ScanStats
	for _, root := range roots {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.Type().IsRegular() {
				return nil
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			stats.Files++
			stats.Bytes += int64(len(data))
			ids := index.find(data)
			slices.Sort(ids) // in the order of the secrets and encodings
			for _, id := range ids {
				p := patterns[id]
				if p.home != "" && sameFile(p.home, path) {
					continue
				}
				found = append(found, Finding{Path: path, Secret: p.secret, Encoding: p.enc.Name})
			}
			return nil
		})
		if err != nil {
			return nil, stats, fmt.Errorf("framework: scanning %s: %w", root, err)
		}
	}
	return found, stats, nil
}
