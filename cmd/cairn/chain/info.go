package chain

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// InfoFile is the name of the chain description in the state dir.
const InfoFile = "chain.json"

// InfoVersion is the format version of chain.json that this package writes
// and reads.
const InfoVersion = 1

// Info describes a running chain: what runs where, and what a client needs to
// call it. `cairn up` writes it to <state-dir>/chain.json once the chain is
// serving (and again, with StoppedAt, after stopping it); Load reads it. It
// holds paths and addresses only: no key material, no passphrases, no PINs.
// Every path is absolute.
type Info struct {
	// Version is InfoVersion.
	Version int `json:"version"`
	// StateDir is the chain's state dir.
	StateDir string `json:"state_dir"`
	// TrustDomain is the SPIFFE trust domain of every identity.
	TrustDomain string `json:"trust_domain"`
	// BasePort is the first port of the chain's range (see PortPlan).
	BasePort int `json:"base_port"`
	// Safes is the kind of safes holding the root key's shares ("file" or
	// "softhsm").
	Safes SafesKind `json:"safes"`
	// LauncherPID is the process id of the `cairn up` that runs the chain.
	LauncherPID int `json:"launcher_pid"`
	// StartedAt is when the chain was ready; StoppedAt when the launcher
	// stopped it (zero while it runs, or if the launcher died).
	StartedAt time.Time `json:"started_at"`
	StoppedAt time.Time `json:"stopped_at,omitzero"`
	// CA is the trust bundle (the dev CA's certificate) every component and
	// client verifies its peers against.
	CA string `json:"ca"`
	// CertsDir is the dev CA directory (--dev-certs of every binary).
	CertsDir string `json:"certs_dir"`
	// Manifest is the public genesis manifest.
	Manifest string `json:"manifest"`
	// BundleSigningPub is the public key every KMS server pins for bundles.
	BundleSigningPub string `json:"bundle_signing_pub"`
	// Components are the chain's processes, in start order.
	Components []Component `json:"components"`
	// Regions are the chain's regions, with their KMS endpoints and demo
	// client.
	Regions []Region `json:"regions"`
	// Regionctl is what running bin/regionctl against this chain needs.
	Regionctl Regionctl `json:"regionctl"`
	// Control is the launcher's control socket (a Unix socket private to
	// its user), through which `cairn up restart` (RestartComponent) asks it
	// to restart a component; "" when it has none.
	Control string `json:"control,omitempty"`
}

// Component is one process of the chain.
type Component struct {
	// Name is its short name: "distributor-1", "rootkms-2", "us-east/kms-1".
	Name string `json:"name"`
	// Kind is "distributor", "rootkms" or "kms".
	Kind string `json:"kind"`
	// Region is the KMS server's region ("" for the others).
	Region string `json:"region,omitempty"`
	// SPIFFEID is the identity it runs as.
	SPIFFEID string `json:"spiffe_id"`
	// Address is its gRPC listener on 127.0.0.1.
	Address string `json:"address"`
	// RaftAddress is a root KMS voter's Raft listener.
	RaftAddress string `json:"raft_address,omitempty"`
	// MetricsAddress is its ops listener (plain HTTP: /metrics, /healthz,
	// /readyz).
	MetricsAddress string `json:"metrics_address,omitempty"`
	// TransitAddress is a KMS server's Vault-transit HTTPS listener (mTLS).
	TransitAddress string `json:"transit_address,omitempty"`
	// PID is its process id.
	PID int `json:"pid"`
	// Log holds its stdout and stderr.
	Log string `json:"log"`
	// StateDir is its state (or Raft data) directory.
	StateDir string `json:"state_dir"`
}

// Region is one region of the chain.
type Region struct {
	// Name is the region, e.g. "us-east".
	Name string `json:"name"`
	// KMS are its KMS servers' gRPC addresses.
	KMS []string `json:"kms"`
	// Keysets are the demo keysets it serves, as Tink key URIs
	// ("cairn-kms://us-east/demo/notes").
	Keysets []string `json:"keysets"`
	// Bundle is the signed config bundle last built for it.
	Bundle string `json:"bundle"`
	// Client is the region's demo client identity.
	Client Identity `json:"client"`
}

// Identity is an X.509-SVID on disk.
type Identity struct {
	// SPIFFEID is the identity's ID.
	SPIFFEID string `json:"spiffe_id"`
	// Cert, Key and CA are the certificate, its private key (mode 0600) and
	// the trust bundle.
	Cert string `json:"cert"`
	Key  string `json:"key"`
	CA   string `json:"ca"`
}

// Regionctl is what running bin/regionctl against the chain needs.
type Regionctl struct {
	// Identity is regionctl's identity.
	Identity Identity `json:"identity"`
	// IdentityFlags are the identity flags to give regionctl (and, with
	// another --name, any Cairn binary): --trust-domain, --dev-certs, --name.
	IdentityFlags []string `json:"identity_flags"`
	// RootKMS are the root KMS voters' API addresses (--rootkms).
	RootKMS []string `json:"rootkms"`
	// Teams and SigningKey are the team config directory and the
	// bundle-signing private key (mode 0600). Keysets live in the root KMS
	// record, not in a local store.
	Teams      string `json:"teams"`
	SigningKey string `json:"signing_key"`
	// Config is regionctl's config file (REGIONCTL_CONFIG=… regionctl
	// keyset list): identity, root KMS, every region's KMS servers.
	Config string `json:"config"`
}

// Region returns the region named name.
func (i *Info) Region(name string) (Region, bool) {
	for _, r := range i.Regions {
		if r.Name == name {
			return r, true
		}
	}
	return Region{}, false
}

// Validate reports an Info that a client could not use.
func (i *Info) Validate() error {
	var errs []error
	if i.Version != InfoVersion {
		errs = append(errs, fmt.Errorf("chain: %s version %d, this cairn reads version %d", InfoFile, i.Version, InfoVersion))
	}
	if i.TrustDomain == "" || i.CA == "" {
		errs = append(errs, fmt.Errorf("chain: %s names no trust domain or CA", InfoFile))
	}
	if len(i.Regions) == 0 {
		errs = append(errs, fmt.Errorf("chain: %s lists no regions", InfoFile))
	}
	for _, r := range i.Regions {
		if len(r.KMS) == 0 {
			errs = append(errs, fmt.Errorf("chain: %s: region %q has no KMS endpoints", InfoFile, r.Name))
		}
	}
	return errors.Join(errs...)
}

// ErrNoChain is wrapped by Load's error when the state dir holds no
// chain.json: `cairn up` never got a chain ready there.
var ErrNoChain = errors.New("chain: no chain.json")

// Load reads <stateDir>/chain.json. A chain that was stopped still loads;
// check StoppedAt (and whether LauncherPID runs) before calling it.
func Load(stateDir string) (*Info, error) {
	path := filepath.Join(stateDir, InfoFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s: start a chain with `make up` (or `cairn up --state-dir %s`)", ErrNoChain, stateDir, stateDir)
	}
	if err != nil {
		return nil, fmt.Errorf("chain: %w", err)
	}
	// Unknown fields are ignored: a newer cairn may add some; Version
	// changes when a reader could no longer use the file.
	var info Info
	if err := json.Unmarshal(data, &info); err != nil {
		return nil, fmt.Errorf("chain: %s: %w", path, err)
	}
	if err := info.Validate(); err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, path)
	}
	return &info, nil
}

// write writes the Info to <StateDir>/chain.json (mode 0644: it holds paths
// and addresses only).
func (i *Info) write() error {
	i.Version = InfoVersion
	return writeJSONFile(filepath.Join(i.StateDir, InfoFile), i, 0o644)
}
