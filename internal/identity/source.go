package identity

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// SourceConfig says where a process finds its certificate, its private key
// and the trust bundle.
type SourceConfig struct {
	// CertFile is the PEM certificate chain, leaf first (an X.509-SVID).
	CertFile string
	// KeyFile is the PEM PKCS#8 private key of the leaf. It must not be
	// readable by group or others.
	KeyFile string
	// BundleFile is the PEM trust bundle (CA certificates) of TrustDomain.
	BundleFile string
	// TrustDomain is the process's trust domain; the leaf's ID must be in it.
	TrustDomain spiffeid.TrustDomain
	// CheckInterval is how often, at most, a handshake looks at the files'
	// modification stamps to reload them (zero: DefaultCheckInterval;
	// negative: only on Reload).
	CheckInterval time.Duration
	// Logger receives reload events; nil discards them.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// DefaultCheckInterval is SourceConfig.CheckInterval's default.
const DefaultCheckInterval = 5 * time.Second

// Validate reports a configuration that cannot work.
func (c SourceConfig) Validate() error {
	var errs []error
	if c.CertFile == "" {
		errs = append(errs, errors.New("identity: no certificate file"))
	}
	if c.KeyFile == "" {
		errs = append(errs, errors.New("identity: no key file"))
	}
	if c.BundleFile == "" {
		errs = append(errs, errors.New("identity: no trust bundle file"))
	}
	if c.TrustDomain.IsZero() {
		errs = append(errs, errors.New("identity: no trust domain"))
	}
	return errors.Join(errs...)
}

// Source is a process's X.509-SVID and trust bundle, loaded from files and
// reloaded when they change, without a restart. It implements go-spiffe's
// x509svid.Source and x509bundle.Source. A reload that fails (a half-written
// file, a key that does not match, a certificate of another identity) keeps
// the previous material and is logged; the process's identity never changes
// after NewSource.
type Source struct {
	cfg       SourceConfig
	interval  time.Duration
	log       *slog.Logger
	now       func() time.Time
	mu        sync.Mutex // serialises reloads
	cur       atomic.Pointer[material]
	lastCheck atomic.Int64 // unix nanoseconds of the last stamp check
}

type material struct {
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
	id     ID
	stamps [3]stamp
}

// stamp is what tells that a file changed.
type stamp struct {
	mod   time.Time
	size  int64
	inode uint64
}

// NewSource loads the files once and fails if they are not a valid SVID of
// the trust domain that chains to the bundle.
func NewSource(cfg SourceConfig) (*Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Source{cfg: cfg, interval: cfg.CheckInterval, log: cfg.Logger, now: cfg.Now}
	if s.interval == 0 {
		s.interval = DefaultCheckInterval
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	m, err := s.load(ID{})
	if err != nil {
		return nil, err
	}
	s.cur.Store(m)
	s.lastCheck.Store(s.now().UnixNano())
	return s, nil
}

// ID returns the process's own identity.
func (s *Source) ID() ID { return s.cur.Load().id }

// TrustDomain returns the source's trust domain.
func (s *Source) TrustDomain() spiffeid.TrustDomain { return s.cfg.TrustDomain }

// GetX509SVID implements x509svid.Source.
func (s *Source) GetX509SVID() (*x509svid.SVID, error) {
	s.maybeReload()
	return s.cur.Load().svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.maybeReload()
	if td != s.cfg.TrustDomain {
		return nil, fmt.Errorf("identity: no trust bundle for trust domain %q (this process trusts %q)", td.Name(), s.cfg.TrustDomain.Name())
	}
	return s.cur.Load().bundle, nil
}

// Reload reloads the files now if they changed since the last load. On error
// the previous material stays in use.
func (s *Source) Reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastCheck.Store(s.now().UnixNano())
	old := s.cur.Load()
	stamps, err := s.stamps()
	if err != nil {
		return err
	}
	if stamps == old.stamps {
		return nil
	}
	m, err := s.load(old.id)
	if err != nil {
		return err
	}
	s.cur.Store(m)
	s.log.Info("identity: reloaded certificate", "id", m.id.String(), "not_after", m.svid.Certificates[0].NotAfter)
	return nil
}

func (s *Source) maybeReload() {
	if s.interval < 0 {
		return
	}
	now := s.now().UnixNano()
	if now-s.lastCheck.Load() < int64(s.interval) {
		return
	}
	if err := s.Reload(); err != nil {
		s.log.Warn("identity: certificate reload failed; keeping the previous certificate", "err", err)
	}
}

func (s *Source) stamps() ([3]stamp, error) {
	var out [3]stamp
	for i, path := range []string{s.cfg.CertFile, s.cfg.KeyFile, s.cfg.BundleFile} {
		fi, err := os.Stat(path)
		if err != nil {
			return out, fmt.Errorf("identity: %w", err)
		}
		out[i] = stamp{mod: fi.ModTime(), size: fi.Size()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			out[i].inode = st.Ino
		}
	}
	return out, nil
}

// load reads and checks the files. If want is not zero the leaf must carry
// that ID.
func (s *Source) load(want ID) (*material, error) {
	stamps, err := s.stamps()
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(s.cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("identity: key file %s has mode %v; it must not be readable by group or others (chmod 600)", s.cfg.KeyFile, fi.Mode().Perm())
	}
	svid, err := x509svid.Load(s.cfg.CertFile, s.cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("identity: loading %s and %s: %w", s.cfg.CertFile, s.cfg.KeyFile, err)
	}
	id, err := FromSPIFFEID(svid.ID)
	if err != nil {
		return nil, err
	}
	if id.TrustDomain() != s.cfg.TrustDomain {
		return nil, fmt.Errorf("identity: certificate %s is for %s, not in trust domain %q", s.cfg.CertFile, id, s.cfg.TrustDomain.Name())
	}
	if !want.IsZero() && id != want {
		return nil, fmt.Errorf("identity: certificate %s changed identity from %s to %s; restart the process to change identity", s.cfg.CertFile, want, id)
	}
	bundle, err := x509bundle.Load(s.cfg.TrustDomain, s.cfg.BundleFile)
	if err != nil {
		return nil, fmt.Errorf("identity: loading trust bundle %s: %w", s.cfg.BundleFile, err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		return nil, fmt.Errorf("identity: certificate %s does not verify against trust bundle %s: %w", s.cfg.CertFile, s.cfg.BundleFile, err)
	}
	return &material{svid: svid, bundle: bundle, id: id, stamps: stamps}, nil
}
