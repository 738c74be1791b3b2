package chain

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cairnkms/cairn/internal/atomicfile"
)

// layout names every path under a state dir.
//
//	setup.json                the setup record: written when a first run is ready
//	chain.json                what runs where (Info), rewritten by every run
//	certs/                    the dev CA and every identity (cairn dev certs)
//	safes/safe-N.json         safe configs; safe-N.passphrase or safe-N.pin (0600)
//	safes/safe-N/             file safe N's sealed share
//	softhsm/                  softhsm2.conf and tokens/ (SoftHSM2 safes only)
//	genesis.json              the public genesis manifest
//	distributor-N/            distributor N's pinned manifest and audit log
//	rootkms-N/                root KMS voter N's Raft data and audit log
//	kms/<region>/kms-N/       KMS server state: the last applied (wrapped) bundle, audit log
//	regionctl/keys/           the bundle-signing key pair
//	regionctl/teams/demo.json the demo team's keysets
//	regionctl/bundles/        signed bundles, <region>-<serial>.bundle
//	logs/                     every process's stdout and stderr
//	run/launcher.sock         the running launcher's control socket (0700 dir)
type layout struct{ dir string }

func (l layout) path(elem ...string) string {
	return filepath.Join(append([]string{l.dir}, elem...)...)
}

func (l layout) setup() string              { return l.path("setup.json") }
func (l layout) chainJSON() string          { return l.path(InfoFile) }
func (l layout) certs() string              { return l.path("certs") }
func (l layout) safes() string              { return l.path("safes") }
func (l layout) safeConfig(i int) string    { return l.path("safes", fmt.Sprintf("safe-%d.json", i)) }
func (l layout) softhsm() string            { return l.path("softhsm") }
func (l layout) manifest() string           { return l.path("genesis.json") }
func (l layout) distributor(i int) string   { return l.path(distributorName(i)) }
func (l layout) rootKMS(i int) string       { return l.path(rootKMSName(i)) }
func (l layout) kms(r string, i int) string { return l.path("kms", r, "kms-"+strconv.Itoa(i)) }
func (l layout) keys() string               { return l.path("regionctl", "keys") }
func (l layout) signingKey() string         { return l.path("regionctl", "keys", "bundle-signing.key") }
func (l layout) signingPub() string         { return l.path("regionctl", "keys", "bundle-signing.pub") }
func (l layout) teams() string              { return l.path("regionctl", "teams") }
func (l layout) regionctlConfig() string    { return l.path("regionctl", "regionctl.json") }
func (l layout) bundle(r string, serial int) string {
	return l.path("regionctl", "bundles", fmt.Sprintf("%s-%d.bundle", r, serial))
}
func (l layout) logs() string { return l.path("logs") }

// setupRecordVersion is the format version of setup.json.
const setupRecordVersion = 1

// setupRecord is setup.json: what a first run made the chain with. It is
// written once the first run's chain is serving, so a state dir without it
// is from a run that did not finish.
type setupRecord struct {
	Version      int       `json:"version"`
	TrustDomain  string    `json:"trust_domain"`
	Regions      []string  `json:"regions"`
	Safes        SafesKind `json:"safes"`
	BasePort     int       `json:"base_port"`
	PKCS11Module string    `json:"pkcs11_module,omitempty"`
	GenesisID    string    `json:"genesis_id"`
	CreatedAt    time.Time `json:"created_at"`
}

// ErrUnfinished matches (errors.Is) the error for a state dir that a first
// run left before its chain was ready.
var ErrUnfinished = errors.New("chain: state dir is from an unfinished run")

// unfinishedError is the error for a state dir that a first run left before
// its chain was ready.
type unfinishedError struct{ dir string }

func (e unfinishedError) Error() string {
	return fmt.Sprintf("chain: state dir %s is from an unfinished run (it has no setup.json, which a first run writes once the chain serves); "+
		"remove it (rm -rf %s) or use another --state-dir", e.dir, e.dir)
}

func (e unfinishedError) Is(target error) bool { return target == ErrUnfinished }

// inspectState looks at the state dir: it returns nil (a first run) when dir
// does not exist or is empty, the setup record when a first run completed
// there, and an error otherwise (an unfinished run, a damaged state dir, not
// a directory).
func inspectState(dir string) (*setupRecord, error) {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("chain: state dir: %w", err)
	case len(entries) == 0:
		return nil, nil
	}
	l := layout{dir}
	data, err := os.ReadFile(l.setup())
	if errors.Is(err, fs.ErrNotExist) {
		for _, e := range entries {
			if !ownEntry(e.Name()) {
				// Never suggest removing a directory cairn up did not make.
				return nil, fmt.Errorf("chain: state dir %s is not empty and was not made by cairn up (it holds %q); give a new or empty --state-dir", dir, e.Name())
			}
		}
		return nil, unfinishedError{dir}
	}
	if err != nil {
		return nil, fmt.Errorf("chain: state dir: %w", err)
	}
	rec, err := parseSetupRecord(data)
	if err != nil {
		return nil, fmt.Errorf("chain: %s: %w; remove the state dir (rm -rf %s) or use another --state-dir", l.setup(), err, dir)
	}
	// What a re-run cannot do without.
	need := []string{l.certs() + "/ca.pem", l.manifest(), l.signingPub()}
	for i := 1; i <= numSafes; i++ {
		need = append(need, l.safeConfig(i))
	}
	for i := 1; i <= numDistributors; i++ {
		need = append(need, filepath.Join(l.distributor(i), "genesis.json"))
	}
	for i := 1; i <= numRootKMS; i++ {
		need = append(need, filepath.Join(l.rootKMS(i), "raft.db"))
	}
	for _, p := range need {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("chain: state dir %s is damaged: %v; remove it (rm -rf %s) for a new chain, or use another --state-dir", dir, err, dir)
		}
	}
	return rec, nil
}

// ownEntry reports whether name is something cairn up makes directly in a
// state dir.
func ownEntry(name string) bool {
	switch name {
	case "setup.json", InfoFile, "certs", "safes", "softhsm", "genesis.json", "kms", "regionctl", "logs", controlDirName:
		return true
	}
	for i := 1; i <= max(numDistributors, numRootKMS); i++ {
		if name == distributorName(i) || name == rootKMSName(i) {
			return true
		}
	}
	return strings.HasPrefix(name, ".") // atomicfile's temporary files
}

func parseSetupRecord(data []byte) (*setupRecord, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var rec setupRecord
	if err := dec.Decode(&rec); err != nil {
		return nil, fmt.Errorf("setup record: %w", err)
	}
	if rec.Version != setupRecordVersion {
		return nil, fmt.Errorf("setup record version %d, this cairn reads version %d", rec.Version, setupRecordVersion)
	}
	if rec.Safes != SafesFile && rec.Safes != SafesSoftHSM {
		return nil, fmt.Errorf("setup record: safes %q, want %s or %s", rec.Safes, SafesFile, SafesSoftHSM)
	}
	return &rec, nil
}

// writeSetupRecord writes setup.json (mode 0644: it holds nothing secret).
func writeSetupRecord(path string, rec *setupRecord) error {
	rec.Version = setupRecordVersion
	return writeJSONFile(path, rec, 0o644)
}

// writeJSONFile writes v as indented JSON to path with mode, atomically.
func writeJSONFile(path string, v any, mode os.FileMode) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("chain: encoding %s: %w", filepath.Base(path), err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	if err := atomicfile.Write(path, append(data, '\n'), mode); err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	return nil
}
