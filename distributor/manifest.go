package distributor

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"os"

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
