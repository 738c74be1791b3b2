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

	"github.com/cairnkms/cairn/internal/bundle"
	regionname "github.com/cairnkms/cairn/internal/region"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
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
//	 "propagation_window": "10m",
//	 "message_budget": {"limit": 4294967296, "rotate_at": 0.25},
//	 "quotas": {"default": {"requests_per_second": 1000, "burst": 2000, "max_concurrent": 64},
//	            "callers": [{"pattern": "client/us-east/batch", "max_concurrent": 8}]}}
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
	// MessageBudget is the AES-GCM message budget; absent means the
	// defaults (see FileBudget).
	MessageBudget *FileBudget `json:"message_budget"`
	// Quotas are the per-caller quotas written into every bundle built
	// (absent: none; every KMS server then applies its own default).
	Quotas *FileQuotas `json:"quotas"`

	window time.Duration
}

// FileBudget is the AES-GCM message budget of every keyset: Tink's AES-GCM
// draws a random 96-bit nonce per message, safe for about 2^32 messages
// under one key version.
type FileBudget struct {
	// Limit is the encryptions a key version may make fleet-wide, written
	// into every bundle (encrypt_limit): a KMS server refuses to encrypt
	// with a version past it. 0 or absent: bundle.DefaultEncryptLimit
	// (2^32).
	Limit uint64 `json:"limit"`
	// RotateAt is the fraction of Limit, in (0, 1], at which rotate --due
	// adds a version (absent: DefaultRotateAt).
	RotateAt *float64 `json:"rotate_at"`
}

// FileQuotas are the per-caller quotas of the KMS data plane: each KMS
// server bounds each caller's calls (kms.v1.KMS and the transit API) by the
// first quota of Callers whose pattern matches the caller's SPIFFE ID, else
// by Default, else by the server's own default (kms.Config.DefaultQuota: a
// quarter of its --max-in-flight calls at once, no rate limit). A call over
// its quota gets RESOURCE_EXHAUSTED with a retry delay. Quotas are per
// server: a client spread over a region's N servers gets up to N times its
// quota there.
type FileQuotas struct {
	Default *FileQuota  `json:"default"`
	Callers []FileQuota `json:"callers"`
}

// FileQuota is one quota. A zero or absent limit is no limit of its kind.
type FileQuota struct {
	// Pattern is a SPIFFE ID pattern as in team ACLs ("client/us-east/*");
	// not in Default.
	Pattern string `json:"pattern"`
	// RequestsPerSecond is the sustained rate of calls (a batch is one).
	RequestsPerSecond uint32 `json:"requests_per_second"`
	// Burst is how many calls may come at once above the rate (absent:
	// one second's worth).
	Burst uint32 `json:"burst"`
	// MaxConcurrent bounds the caller's calls in progress on one server.
	MaxConcurrent uint32 `json:"max_concurrent"`
}

func (q FileQuota) proto() *bundlev1.Quota {
	return &bundlev1.Quota{Pattern: q.Pattern, RequestsPerSecond: q.RequestsPerSecond, Burst: q.Burst, MaxConcurrent: q.MaxConcurrent}
}

// quotas returns the quotas bundles carry (compile.Input.Quotas and
// DefaultQuota); bundle validation checks them.
func (f *File) quotas() ([]*bundlev1.Quota, *bundlev1.Quota) {
	if f == nil || f.Quotas == nil {
		return nil, nil
	}
	var qs []*bundlev1.Quota
	for _, q := range f.Quotas.Callers {
		qs = append(qs, q.proto())
	}
	var def *bundlev1.Quota
	if d := f.Quotas.Default; d != nil {
		def = d.proto()
	}
	return qs, def
}

// DefaultRotateAt is the fraction of the message budget at which rotate
// --due adds a version: early enough that the new version propagates and is
// promoted long before the limit, even while every KMS server spends the
// remaining budget it last heard of.
const DefaultRotateAt = 0.25

// messageBudget is the message budget regionctl works with.
type messageBudget struct {
	limit    uint64  // never 0
	rotateAt float64 // in (0, 1]
}

// budget returns the file's message budget, defaults filled in.
func (f *File) budget() messageBudget {
	b := messageBudget{limit: bundle.DefaultEncryptLimit, rotateAt: DefaultRotateAt}
	if mb := f.MessageBudget; mb != nil {
		if mb.Limit != 0 {
			b.limit = mb.Limit
		}
		if mb.RotateAt != nil {
			b.rotateAt = *mb.RotateAt
		}
	}
	return b
}

// encryptLimit is the encrypt_limit bundles carry (compile.Input.EncryptLimit).
func (f *File) encryptLimit() uint64 { return f.budget().limit }

// checkRotateAt refuses a rotate-at fraction (named name) outside (0, 1].
func checkRotateAt(name string, x float64) error {
	if !(x > 0 && x <= 1) {
		return fmt.Errorf("%s %v: want a fraction of the limit in (0, 1], such as 0.25", name, x)
	}
	return nil
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
	fileKeys     = []string{"trust_domain", "identity", "rootkms", "regions", "signing_key", "signing_pub", "signing_pubs", "teams", "propagation_window", "message_budget", "quotas"}
	identityKeys = []string{"dev_certs", "name", "cert", "key", "ca"}
	budgetKeys   = []string{"limit", "rotate_at"}
	quotasKeys   = []string{"default", "callers"}
	quotaKeys    = []string{"pattern", "requests_per_second", "burst", "max_concurrent"}
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
	if mb, ok := top["message_budget"]; ok {
		if err := checkObjectKeys(mb, "message_budget.", budgetKeys); err != nil {
			return nil, err
		}
	}
	if qs, ok := top["quotas"]; ok {
		if err := checkQuotaKeys(qs); err != nil {
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
	if mb := f.MessageBudget; mb != nil && mb.RotateAt != nil {
		if err := checkRotateAt("message_budget.rotate_at", *mb.RotateAt); err != nil {
			return nil, err
		}
	}
	id := f.Identity
	if id.DevCerts != "" && (id.Cert != "" || id.Key != "" || id.CA != "") {
		return nil, errors.New("identity: give either dev_certs and name, or cert, key and ca")
	}
	return &f, nil
}

// checkQuotaKeys checks the keys of "quotas" and of each quota in it.
func checkQuotaKeys(data []byte) error {
	if err := checkObjectKeys(data, "quotas.", quotasKeys); err != nil {
		return err
	}
	var qs map[string]json.RawMessage
	_ = json.Unmarshal(data, &qs)
	if d, ok := qs["default"]; ok && string(d) != "null" {
		if err := checkObjectKeys(d, "quotas.default.", quotaKeys); err != nil {
			return err
		}
	}
	var callers []json.RawMessage
	if c, ok := qs["callers"]; ok && json.Unmarshal(c, &callers) == nil {
		for i, q := range callers {
			if err := checkObjectKeys(q, fmt.Sprintf("quotas.callers[%d].", i), quotaKeys); err != nil {
				return err
			}
		}
	}
	return nil
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
