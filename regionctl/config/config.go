// Package config reads the per-team keyset config files SREs keep: one JSON
// file per team, listing the team's keysets with their regions, purpose, key
// template, rotation period, ciphertext TTL and per-operation ACL.
//
// Every file is decoded strictly (no unknown, duplicate or mis-cased field,
// nothing after the object) and validated on its own, so one bad file cannot
// take down the others: LoadDir returns the good teams and one error per bad
// file.
//
//	{"team": "payments",
//	 "keysets": [{"name": "payments/ledger", "regions": ["us-east", "eu-west"],
//	   "purpose": "envelope", "template": "AES256_GCM",
//	   "rotation_period": "2160h", "ciphertext_ttl": "8760h",
//	   "acl": {"encrypt": ["client/us-east/*"], "decrypt": ["client/*/ledger"],
//	           "generate_data_key": [], "rewrap": []}}]}
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/region"
)

// MaxFileSize bounds one team file.
const MaxFileSize = 4 << 20

// Ext is the extension of team files; LoadDir reads only these.
const Ext = ".json"

// PurposeEnvelope is the only purpose a keyset may have (in the file:
// "purpose": "envelope").
const PurposeEnvelope = "envelope"

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("config: invalid team config")

// Team is one team's validated config. Build it with Parse, LoadFile or
// LoadDir.
type Team struct {
	// Name is the team's name; every keyset name starts with Name + "/".
	Name string
	// File is the file the team was read from ("" if parsed from bytes).
	File string
	// Keysets are the team's keysets, in file order.
	Keysets []Keyset
}

// Keyset is one validated keyset entry.
type Keyset struct {
	// Name is the keyset's name, e.g. "payments/ledger".
	Name string
	// Team is the owning team.
	Team string
	// Regions are the regions that serve the keyset, as written (unique).
	Regions []string
	// Purpose is PurposeEnvelope.
	Purpose string
	// Template is the Tink key template of new keys ("" means
	// keysets.DefaultTemplate).
	Template string
	// RotationPeriod and CiphertextTTL are positive.
	RotationPeriod, CiphertextTTL time.Duration
	// ACL holds the SPIFFE ID patterns as written; each parses in the trust
	// domain the file was validated in.
	ACL ACL
}

// ACL lists the SPIFFE ID patterns allowed per operation. Empty means
// nobody.
type ACL struct {
	Encrypt         []string `json:"encrypt"`
	Decrypt         []string `json:"decrypt"`
	GenerateDataKey []string `json:"generate_data_key"`
	Rewrap          []string `json:"rewrap"`
}

// file is the on-disk shape.
type file struct {
	Team    string        `json:"team"`
	Keysets []keysetEntry `json:"keysets"`
}

type keysetEntry struct {
	Name           string   `json:"name"`
	Regions        []string `json:"regions"`
	Purpose        string   `json:"purpose"`
	Template       string   `json:"template"`
	RotationPeriod string   `json:"rotation_period"`
	CiphertextTTL  string   `json:"ciphertext_ttl"`
	ACL            *ACL     `json:"acl"`
}

// teamPattern is one keyset-name segment: a team name.
var teamPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// keyPattern is what every JSON object key must look like. encoding/json
// matches field names case-insensitively (with Unicode folding); allowing
// only lowercase ASCII keys makes the match exact.
var keyPattern = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

// Parse decodes and validates one team file. Relative ACL patterns are
// resolved in td, which must not be zero.
func Parse(data []byte, td spiffeid.TrustDomain) (*Team, error) {
	if td.IsZero() {
		return nil, errors.New("config: no trust domain to resolve ACL patterns in")
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrInvalid, len(data), MaxFileSize)
	}
	if err := checkKeys(data); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f file
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: data after the team object", ErrInvalid)
	}
	return validate(&f, td)
}

// checkKeys walks the JSON tokens and refuses an object key that is repeated
// within its object (encoding/json would keep the last one silently) or is
// not lowercase ASCII.
func checkKeys(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	type frame struct {
		object bool
		keys   map[string]bool
		expect bool // in an object, the next token is a key
	}
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var top *frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if top != nil && top.object && top.expect {
			if d, ok := tok.(json.Delim); ok && d == '}' {
				stack = stack[:len(stack)-1]
				continue
			}
			key, _ := tok.(string)
			if !keyPattern.MatchString(key) {
				return fmt.Errorf("field %q: field names are lowercase (a-z, 0-9, _)", key)
			}
			if top.keys[key] {
				return fmt.Errorf("field %q appears twice in one object", key)
			}
			top.keys[key] = true
			top.expect = false
			continue
		}
		if top != nil && top.object {
			top.expect = true // this token is a value; a key comes next
		}
		if d, ok := tok.(json.Delim); ok {
			switch d {
			case '{':
				stack = append(stack, &frame{object: true, keys: map[string]bool{}, expect: true})
			case '[':
				stack = append(stack, &frame{})
			case ']':
				stack = stack[:len(stack)-1]
			}
		}
	}
}

func validate(f *file, td spiffeid.TrustDomain) (*Team, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	team := f.Team
	if !teamPattern.MatchString(team) {
		return nil, bad("team %q: use one lowercase segment of a-z 0-9 . _ - (e.g. payments)", team)
	}
	if len(f.Keysets) == 0 {
		return nil, bad("team %q lists no keysets", team)
	}
	t := &Team{Name: team}
	seen := map[string]bool{}
	for i, k := range f.Keysets {
		where := fmt.Sprintf("keysets[%d] (%q)", i, k.Name)
		if err := keysets.ValidName(k.Name); err != nil {
			return nil, bad("%s: %v", where, err)
		}
		if !strings.HasPrefix(k.Name, team+"/") {
			return nil, bad("%s: the names of team %q's keysets start with %q", where, team, team+"/")
		}
		if seen[k.Name] {
			return nil, bad("%s: listed twice", where)
		}
		seen[k.Name] = true
		if len(k.Regions) == 0 {
			return nil, bad("%s: no regions", where)
		}
		regions := map[string]bool{}
		for _, r := range k.Regions {
			if err := region.ValidName(r); err != nil {
				return nil, bad("%s: region %q: use [a-z][a-z0-9-]{0,62}, e.g. us-east", where, r)
			}
			if regions[r] {
				return nil, bad("%s: region %q listed twice", where, r)
			}
			regions[r] = true
		}
		if k.Purpose != PurposeEnvelope {
			return nil, bad("%s: purpose %q; the only purpose is %q", where, k.Purpose, PurposeEnvelope)
		}
		if _, err := keysets.Template(k.Template); err != nil {
			return nil, bad("%s: %v", where, err)
		}
		rotation, err := positiveDuration(k.RotationPeriod)
		if err != nil {
			return nil, bad("%s: rotation_period: %v", where, err)
		}
		ttl, err := positiveDuration(k.CiphertextTTL)
		if err != nil {
			return nil, bad("%s: ciphertext_ttl: %v", where, err)
		}
		var acl ACL
		if k.ACL != nil {
			acl = *k.ACL
		}
		for _, op := range []struct {
			name     string
			patterns []string
		}{{"encrypt", acl.Encrypt}, {"decrypt", acl.Decrypt}, {"generate_data_key", acl.GenerateDataKey}, {"rewrap", acl.Rewrap}} {
			if _, err := identity.ParseAllowlist(td, op.patterns...); err != nil {
				return nil, bad("%s: acl.%s: %v", where, op.name, err)
			}
		}
		t.Keysets = append(t.Keysets, Keyset{
			Name: k.Name, Team: team, Regions: slices.Clone(k.Regions), Purpose: k.Purpose, Template: k.Template,
			RotationPeriod: rotation, CiphertextTTL: ttl,
			ACL: ACL{Encrypt: slices.Clone(acl.Encrypt), Decrypt: slices.Clone(acl.Decrypt),
				GenerateDataKey: slices.Clone(acl.GenerateDataKey), Rewrap: slices.Clone(acl.Rewrap)},
		})
	}
	return t, nil
}

func positiveDuration(s string) (time.Duration, error) {
	if s == "" {
		return 0, errors.New(`missing; a Go duration such as "2160h"`)
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, err
	}
	if d <= 0 {
		return 0, fmt.Errorf("%q: must be positive", s)
	}
	return d, nil
}

// LoadFile reads and validates one team file.
func LoadFile(path string, td spiffeid.TrustDomain) (*Team, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("config: %s: %w", path, err)
	}
	t, err := Parse(data, td)
	if err != nil {
		return nil, err
	}
	t.File = path
	return t, nil
}

// FileError is one team file that was left out, and why.
type FileError struct {
	File string
	Err  error
}

func (e FileError) Error() string { return e.File + ": " + e.Err.Error() }

// Unwrap returns the underlying error.
func (e FileError) Unwrap() error { return e.Err }

// LoadDir reads every *.json file directly in dir (sorted by name), validates
// each on its own, and returns the good teams and one FileError per bad file.
// A team defined in more than one file, or a keyset name in more than one
// file, makes every file involved bad. The error is non-nil only if dir
// itself cannot be read.
func LoadDir(dir string, td spiffeid.TrustDomain) ([]*Team, []FileError, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("config: %w", err)
	}
	var (
		loaded []*Team
		bad    []FileError
	)
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), Ext) || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		path := filepath.Join(dir, e.Name())
		t, err := LoadFile(path, td)
		if err != nil {
			bad = append(bad, FileError{File: path, Err: err})
			continue
		}
		loaded = append(loaded, t)
	}
	// Cross-file checks: a team or keyset defined twice is ambiguous, so
	// neither definition is used.
	teamFiles := map[string][]string{}
	keysetFiles := map[string][]string{}
	for _, t := range loaded {
		teamFiles[t.Name] = append(teamFiles[t.Name], t.File)
		for _, k := range t.Keysets {
			keysetFiles[k.Name] = append(keysetFiles[k.Name], t.File)
		}
	}
	var good []*Team
	for _, t := range loaded {
		var errs []error
		if others := without(teamFiles[t.Name], t.File); len(others) > 0 {
			errs = append(errs, fmt.Errorf("%w: team %q is also defined in %s", ErrInvalid, t.Name, strings.Join(others, ", ")))
		}
		for _, k := range t.Keysets {
			if others := without(keysetFiles[k.Name], t.File); len(others) > 0 {
				errs = append(errs, fmt.Errorf("%w: keyset %q is also defined in %s", ErrInvalid, k.Name, strings.Join(others, ", ")))
			}
		}
		if len(errs) > 0 {
			bad = append(bad, FileError{File: t.File, Err: errors.Join(errs...)})
			continue
		}
		good = append(good, t)
	}
	slices.SortFunc(bad, func(a, b FileError) int { return strings.Compare(a.File, b.File) })
	return good, bad, nil
}

func without(files []string, f string) []string {
	var out []string
	for _, x := range files {
		if x != f {
			out = append(out, x)
		}
	}
	return out
}
