package identity

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Flags are the command-line flags every Cairn binary uses to find its
// identity: either explicit files, or a dev-certs directory (as written by
// `cairn dev certs`) and the component's tier/region/name.
type Flags struct {
	Cert, Key, CA string
	TrustDomain   string
	DevCerts      string
	Name          string
}

// Register adds the flags to fs.
func (f *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&f.Cert, "cert", "", "PEM certificate (X.509-SVID) of this process")
	fs.StringVar(&f.Key, "key", "", "PEM private key of this process (mode 0600)")
	fs.StringVar(&f.CA, "ca", "", "PEM trust bundle")
	fs.StringVar(&f.TrustDomain, "trust-domain", "", "SPIFFE trust domain, e.g. cairn.local")
	fs.StringVar(&f.DevCerts, "dev-certs", "", "directory written by \"cairn dev certs\" (instead of --cert/--key/--ca)")
	fs.StringVar(&f.Name, "name", "", "with --dev-certs: this component's <tier>/<region>/<name>, e.g. distributor/global/distributor-1")
}

// Source loads the identity the flags name.
func (f *Flags) Source(log *slog.Logger) (*Source, error) {
	td, err := spiffeid.TrustDomainFromString(f.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("identity: --trust-domain %q: %v", f.TrustDomain, err)
	}
	cert, key, ca := f.Cert, f.Key, f.CA
	if f.DevCerts != "" {
		if cert != "" || key != "" || ca != "" {
			return nil, errors.New("identity: give either --dev-certs and --name, or --cert, --key and --ca")
		}
		parts := strings.Split(f.Name, "/")
		if len(parts) != 3 {
			return nil, fmt.Errorf("identity: --name %q: want <tier>/<region>/<name>", f.Name)
		}
		if _, err := New(td, parts[0], parts[1], parts[2]); err != nil {
			return nil, err
		}
		dir := filepath.Join(f.DevCerts, parts[0], parts[1], parts[2])
		cert, key, ca = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(f.DevCerts, "ca.pem")
	}
	return NewSource(SourceConfig{CertFile: cert, KeyFile: key, BundleFile: ca, TrustDomain: td, Logger: log})
}

// SplitList splits a comma-separated flag value, dropping empty items.
func SplitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
