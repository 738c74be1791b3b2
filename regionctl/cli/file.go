package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	regionname "github.com/cairnkms/cairn/internal/region"
)

// ConfigEnv names the environment variable holding the default --config.
const ConfigEnv = "REGIONCTL_CONFIG"

// File is regionctl's config file (--config, default $REGIONCTL_CONFIG):
// strict JSON, every field optional, command-line flags win over it.
// Relative paths are resolved against the file's directory.
//
//	{"trust_domain": "cairn.local",
//	 "identity": {"dev_certs": "certs", "name": "regionctl/global/regionctl"},
//	 "rootkms": ["127.0.0.1:7101", "127.0.0.1:7102"],
//	 "regions": {"us-east": ["127.0.0.1:7201", "127.0.0.1:7202"]},
//	 "signing_key": "keys/bundle-signing.key",
//	 "signing_pubs": ["keys/bundle-signing.pub"],
//	 "teams": "teams",
//	 "propagation_window": "10m"}
type File struct {
	TrustDomain string       `json:"trust_domain"`
	Identity    FileIdentity `json:"identity"`
	// RootKMS are API addresses of root KMS replicas.
	RootKMS []string `json:"rootkms"`
	// Regions maps a region to the KMSAdmin addresses of all its servers.
	Regions    map[string][]string `json:"regions"`
	SigningKey string              `json:"signing_key"`
	// SigningPub and SigningPubs are the pinned bundle-signing public keys
	// (both may be given; they add up).
	SigningPub  string   `json:"signing_pub"`
	SigningPubs []string `json:"signing_pubs"`
	Teams       string   `json:"teams"`
	// PropagationWindow is a Go duration ("10m"); empty means
	// safety.DefaultWindow.
	PropagationWindow string `json:"propagation_window"`

	window time.Duration
}

// FileIdentity is either dev_certs + name or cert + key + ca.
type FileIdentity struct {
	DevCerts string `json:"dev_certs"`
	Name     string `json:"name"`
	Cert     string `json:"cert"`
	Key      string `json:"key"`
	CA       string `json:"ca"`
}

var (
	fileKeys     = []string{"trust_domain", "identity", "rootkms", "regions", "signing_key", "signing_pub", "signing_pubs", "teams", "propagation_window"}
	identityKeys = []string{"dev_certs", "name", "cert", "key", "ca"}
)

// LoadFile reads and checks a config file.
func LoadFile(path string) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	f, err := ParseFile(data)
	if err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	f.resolve(filepath.Dir(path))
	return f, nil
}

// ParseFile decodes a config file strictly: an unknown, repeated or
// mis-cased key is refused, naming the key, and so is anything after the
// object.
func ParseFile(data []byte) (*File, error) {
	if err := checkObjectKeys(data, "", fileKeys); err != nil {
		return nil, err
	}
	var top map[string]json.RawMessage
	_ = json.Unmarshal(data, &top)
	if id, ok := top["identity"]; ok {
		if err := checkObjectKeys(id, "identity.", identityKeys); err != nil {
			return nil, err
		}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f File
	if err := dec.Decode(&f); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the config object")
	}
	for r, addrs := range f.Regions {
		if err := regionname.ValidName(r); err != nil {
			return nil, fmt.Errorf("regions: %q: %v", r, err)
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("regions: %q lists no KMS servers", r)
		}
	}
	if f.PropagationWindow != "" {
		d, err := time.ParseDuration(f.PropagationWindow)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("propagation_window: %q: want a positive Go duration such as \"10m\"", f.PropagationWindow)
		}
		f.window = d
	}
	id := f.Identity
	if id.DevCerts != "" && (id.Cert != "" || id.Key != "" || id.CA != "") {
		return nil, errors.New("identity: give either dev_certs and name, or cert, key and ca")
	}
	return &f, nil
}

// checkObjectKeys refuses data unless it is one JSON object whose keys are
// all in allowed, each once, spelled exactly (encoding/json would match
// "Teams" to "teams" and keep the last of two).
func checkObjectKeys(data []byte, prefix string, allowed []string) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("%swant a JSON object", prefix)
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string)
		if !slices.Contains(allowed, key) {
			return fmt.Errorf("unknown key %q (known: %v)", prefix+key, allowed)
		}
		if seen[key] {
			return fmt.Errorf("key %q appears twice", prefix+key)
		}
		seen[key] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return fmt.Errorf("key %q: %w", prefix+key, err)
		}
	}
	return nil
}

func (f *File) resolve(dir string) {
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	abs(&f.Identity.DevCerts)
	abs(&f.Identity.Cert)
	abs(&f.Identity.Key)
	abs(&f.Identity.CA)
	abs(&f.SigningKey)
	abs(&f.SigningPub)
	for i := range f.SigningPubs {
		abs(&f.SigningPubs[i])
	}
	abs(&f.Teams)
}
