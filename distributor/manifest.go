package distributor

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"os"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/identity"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// PinManifest pins the public genesis manifest m at path (a distributor's
// Config.ManifestPath) before the distributor starts, so that a distributor
// joining a fleet can unseal from a peer: the root key it fetches is checked
// against m's KCV. Without a pinned manifest a distributor waits for a
// provisioning ceremony.
//
// An already pinned manifest of the same lineage (genesis id and KCV) is
// replaced only by a later epoch (a rekey); one of another lineage is never
// replaced: PinManifest refuses, and changes nothing. It reports whether it
// wrote the file.
func PinManifest(path string, m *safev1.GenesisManifest) (bool, error) {
	if err := safe.ValidateManifest(m); err != nil {
		return false, err
	}
	pinned, err := safe.ReadManifest(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return false, fmt.Errorf("distributor: the pinned manifest %s: %w", path, err)
	case pinned.GetGenesisId() != m.GetGenesisId() || subtle.ConstantTimeCompare(pinned.GetKcv(), m.GetKcv()) != 1:
		return false, fmt.Errorf("distributor: %s pins genesis %s; refusing to replace it with genesis %s (another root key)",
			path, pinned.GetGenesisId(), m.GetGenesisId())
	case m.GetEpoch() <= pinned.GetEpoch():
		return false, nil // already pinned, at this epoch or a later one
	}
	if err := safe.WriteManifest(path, m); err != nil {
		return false, err
	}
	return true, nil
}

// CheckManifest reports whether a distributor of trust domain td can use
// manifest m: m is valid (safe.ValidateManifest: among others, every
// officer it names is a full SPIFFE ID) and every officer it binds a share
// to is of td. An officer of another trust domain could never connect to
// the distributor, so that share could never be released.
func CheckManifest(m *safev1.GenesisManifest, td spiffeid.TrustDomain) error {
	if err := safe.ValidateManifest(m); err != nil {
		return err
	}
	if err := checkOfficers(safe.Officers(m), td); err != nil {
		return fmt.Errorf("%w: %w", safe.ErrInvalidManifest, err)
	}
	return nil
}

// checkOfficers checks the officers a split binds its shares to, one entry
// per share ("" where none is named): safe.ValidateOfficers, and each named
// one of trust domain td.
func checkOfficers(officers []string, td spiffeid.TrustDomain) error {
	if err := safe.ValidateOfficers(officers); err != nil {
		return err
	}
	for i, o := range officers {
		if o == "" {
			continue
		}
		if id, err := identity.Parse(o); err != nil || id.TrustDomain() != td {
			return fmt.Errorf("officer %s of share %d is not of this distributor's trust domain %s: it could never connect to release that share", o, i+1, td.Name())
		}
	}
	return nil
}
