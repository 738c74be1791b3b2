package framework

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Secret is key material that must not appear in any file: the RMK or a
// Shamir share.
type Secret struct {
	Name  string
	Value []byte
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

// Scan reads every regular file under the roots and reports each secret
// found in any of its Encodings. Symbolic links are not followed.
func Scan(roots []string, secrets []Secret) ([]Finding, ScanStats, error) {
	type pattern struct {
		secret string
		enc    Encoding
	}
	var patterns []pattern
	for _, s := range secrets {
		if len(s.Value) < 16 {
			return nil, ScanStats{}, fmt.Errorf("framework: secret %s is %d bytes; too short to scan for without false hits", s.Name, len(s.Value))
		}
		for _, e := range Encodings(s.Value) {
			patterns = append(patterns, pattern{s.Name, e})
		}
	}
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
			for _, p := range patterns {
				if bytes.Contains(data, p.enc.Bytes) {
					found = append(found, Finding{Path: path, Secret: p.secret, Encoding: p.enc.Name})
				}
			}
			return nil
		})
		if err != nil {
			return nil, stats, fmt.Errorf("framework: scanning %s: %w", root, err)
		}
	}
	return found, stats, nil
}
