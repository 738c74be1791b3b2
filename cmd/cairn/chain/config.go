package chain

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/region"
)

// Defaults of the zero values of Config.
const (
	// DefaultStateDir is where `cairn up` keeps the chain unless told
	// otherwise (relative to the working directory).
	DefaultStateDir = ".state/up"
	// DefaultBasePort is the first port of the chain's range: distributors
	// listen on 7101-7103, as in the README's walkthrough.
	DefaultBasePort = 7100
	// DefaultTrustDomain is the SPIFFE trust domain of a new chain.
	DefaultTrustDomain = "cairn.local"
)

// DefaultRegions are the regions of a new chain.
var DefaultRegions = []string{"us-east", "eu-west"}

// MaxRegions bounds Config.Regions: the port plan leaves room for this many.
const MaxRegions = 10

// SafesKind says which safes hold the root key's shares.
type SafesKind string

// The kinds of safes.
const (
	// SafesAuto is SoftHSM2 tokens when SoftHSM2 is installed, else file
	// safes. On a re-run it is whatever the chain was made with.
	SafesAuto SafesKind = "auto"
	// SafesFile is insecure, passphrase-protected development file safes.
	SafesFile SafesKind = "file"
	// SafesSoftHSM is SoftHSM2 tokens (PKCS#11), one per safe, in a token
	// directory private to the state dir.
	SafesSoftHSM SafesKind = "softhsm"
)

// Config configures Up. The zero value of every field but StateDir and
// BinDir means "the default on a first run, what the state dir was made with
// on a re-run"; a value that differs from what the state dir was made with is
// an error (a chain's identities, Raft addresses and safes cannot change
// under it).
type Config struct {
	// StateDir holds everything the chain writes (required): certificates,
	// safes, every component's state, logs, chain.json. An empty or missing
	// directory means a first run; one that a first run completed in is
	// reused.
	StateDir string
	// BasePort is the first port of the chain's range on 127.0.0.1 (0:
	// DefaultBasePort). See PortPlan for the offsets.
	BasePort int
	// BinDir holds the safe, distributor, rootkms, kms and regionctl
	// binaries (required).
	BinDir string
	// TrustDomain is the SPIFFE trust domain ("": DefaultTrustDomain).
	TrustDomain string
	// Safes is the kind of safes ("": SafesAuto).
	Safes SafesKind
	// Regions are the chain's regions, each with two KMS servers and a demo
	// client (nil: DefaultRegions).
	Regions []string
	// Demo runs an envelope-encryption round trip through the Tink client
	// once the chain is ready.
	Demo bool
	// Out receives the progress lines, the summary and the stop lines (nil:
	// discarded). Nothing written to it holds key material.
	Out io.Writer
	// Logger receives debug logs (nil: discarded).
	Logger *slog.Logger
}

// Validate reports every problem with c that can be seen without looking at
// the disk.
func (c Config) Validate() error {
	var errs []error
	if strings.TrimSpace(c.StateDir) == "" {
		errs = append(errs, errors.New("chain: no state dir"))
	}
	if strings.TrimSpace(c.BinDir) == "" {
		errs = append(errs, errors.New("chain: no bin dir (the directory of the safe, distributor, rootkms, kms and regionctl binaries)"))
	}
	if c.BasePort != 0 {
		if err := checkBasePort(c.BasePort, len(c.Regions)); err != nil {
			errs = append(errs, err)
		}
	}
	if c.TrustDomain != "" {
		if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
			errs = append(errs, fmt.Errorf("chain: trust domain %q: %v", c.TrustDomain, err))
		}
	}
	switch c.Safes {
	case "", SafesAuto, SafesFile, SafesSoftHSM:
	default:
		errs = append(errs, fmt.Errorf("chain: safes %q, want %s, %s or %s", c.Safes, SafesAuto, SafesFile, SafesSoftHSM))
	}
	if c.Regions != nil {
		if err := validateRegions(c.Regions); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// validateRegions checks regions the way the dev CA (identities) and the
// root KMS (region names) will.
func validateRegions(regions []string) error {
	var errs []error
	switch {
	case len(regions) == 0:
		return errors.New("chain: no regions")
	case len(regions) > MaxRegions:
		return fmt.Errorf("chain: %d regions, at most %d", len(regions), MaxRegions)
	}
	seen := map[string]bool{}
	for _, r := range regions {
		if err := region.ValidName(r); err != nil {
			errs = append(errs, fmt.Errorf("chain: region %q: want a lowercase letter, then a-z, 0-9 or -, at most 63 in all", r))
			continue
		}
		if r == "global" {
			errs = append(errs, errors.New(`chain: region "global" is reserved for components bound to no region`))
			continue
		}
		if seen[r] {
			errs = append(errs, fmt.Errorf("chain: region %q listed twice", r))
		}
		seen[r] = true
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// The dev CA has its own rules; it must accept the regions too.
	p := devca.DefaultPlan(spiffeid.RequireTrustDomainFromString(DefaultTrustDomain))
	p.Regions = regions
	if err := p.Validate(); err != nil {
		return fmt.Errorf("chain: regions: %w", err)
	}
	return nil
}

// checkBasePort checks that the whole port range of a chain with n regions
// (at least the default number) fits above the privileged ports.
func checkBasePort(base, n int) error {
	if n == 0 {
		n = len(DefaultRegions)
	}
	last := base + lastOffset(n)
	if base < 1024 || last > 65535 {
		return fmt.Errorf("chain: base port %d: the chain uses %d to %d; pick a base port from 1024 to %d", base, base+1, last, 65535-lastOffset(n))
	}
	return nil
}

// settings are the effective values of a run: Config merged with the setup
// record of the state dir (on a re-run) and the defaults.
type settings struct {
	StateDir    string // absolute
	BinDir      string // absolute
	BasePort    int
	TrustDomain spiffeid.TrustDomain
	Regions     []string
	Safes       SafesKind // SafesFile or SafesSoftHSM
	Rerun       bool
	Demo        bool
}

// resolve merges c with rec, the setup record of the state dir (nil on a
// first run), and with softhsm, whether SoftHSM2 is installed. stateDir and
// binDir are the absolute directories.
func resolve(c Config, rec *setupRecord, stateDir, binDir string, softhsm bool) (settings, error) {
	s := settings{StateDir: stateDir, BinDir: binDir, Demo: c.Demo, Rerun: rec != nil}
	if rec == nil {
		s.BasePort = c.BasePort
		if s.BasePort == 0 {
			s.BasePort = DefaultBasePort
		}
		td := c.TrustDomain
		if td == "" {
			td = DefaultTrustDomain
		}
		var err error
		if s.TrustDomain, err = spiffeid.TrustDomainFromString(td); err != nil {
			return s, fmt.Errorf("chain: trust domain %q: %v", td, err)
		}
		s.Regions = c.Regions
		if s.Regions == nil {
			s.Regions = DefaultRegions
		}
		switch c.Safes {
		case "", SafesAuto:
			s.Safes = SafesFile
			if softhsm {
				s.Safes = SafesSoftHSM
			}
		case SafesSoftHSM:
			if !softhsm {
				return s, errors.New("chain: --safes softhsm, but SoftHSM2 is not installed (no libsofthsm2.so or no softhsm2-util); install it (make deps) or use --safes file")
			}
			s.Safes = SafesSoftHSM
		default:
			s.Safes = c.Safes
		}
		if err := checkBasePort(s.BasePort, len(s.Regions)); err != nil {
			return s, err
		}
		return s, nil
	}

	// A re-run: the chain is what the state dir was made with.
	made := fmt.Sprintf("state dir %s was made with", stateDir)
	fix := "; leave the flag out, or use another --state-dir for a new chain"
	var errs []error
	if c.BasePort != 0 && c.BasePort != rec.BasePort {
		errs = append(errs, fmt.Errorf("chain: %s --base-port %d, not %d (Raft keeps its members' addresses)%s", made, rec.BasePort, c.BasePort, fix))
	}
	if c.TrustDomain != "" && c.TrustDomain != rec.TrustDomain {
		errs = append(errs, fmt.Errorf("chain: %s --trust-domain %s, not %s%s", made, rec.TrustDomain, c.TrustDomain, fix))
	}
	if c.Regions != nil && strings.Join(c.Regions, ",") != strings.Join(rec.Regions, ",") {
		errs = append(errs, fmt.Errorf("chain: %s --regions %s, not %s%s", made, strings.Join(rec.Regions, ","), strings.Join(c.Regions, ","), fix))
	}
	if c.Safes != "" && c.Safes != SafesAuto && c.Safes != rec.Safes {
		errs = append(errs, fmt.Errorf("chain: %s --safes %s, not %s%s", made, rec.Safes, c.Safes, fix))
	}
	if rec.Safes == SafesSoftHSM && !softhsm {
		errs = append(errs, fmt.Errorf("chain: %s SoftHSM2 tokens, but SoftHSM2 is not installed now; install it (make deps)", made))
	}
	if len(errs) > 0 {
		return s, errors.Join(errs...)
	}
	td, err := spiffeid.TrustDomainFromString(rec.TrustDomain)
	if err != nil {
		return s, fmt.Errorf("chain: %s: setup record: trust domain %q: %v", stateDir, rec.TrustDomain, err)
	}
	if err := validateRegions(rec.Regions); err != nil {
		return s, fmt.Errorf("chain: %s: setup record: %w", stateDir, err)
	}
	if err := checkBasePort(rec.BasePort, len(rec.Regions)); err != nil {
		return s, fmt.Errorf("chain: %s: setup record: %w", stateDir, err)
	}
	s.BasePort, s.TrustDomain, s.Regions, s.Safes = rec.BasePort, td, rec.Regions, rec.Safes
	return s, nil
}
