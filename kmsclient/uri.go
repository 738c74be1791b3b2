package kmsclient

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cairnkms/cairn/internal/keysets"
	regionname "github.com/cairnkms/cairn/internal/region"
)

// Scheme is the prefix of every Cairn key URI. A key URI names one keyset of
// one region: cairn-kms://<region>/<keyset>, e.g.
// cairn-kms://us-east/payments/ledger. The scheme is matched exactly
// (lowercase), as Tink's own KMS clients do.
const Scheme = "cairn-kms://"

// ErrInvalidURI is wrapped by every error about a malformed key URI.
var ErrInvalidURI = errors.New("kmsclient: invalid key URI")

// ParseKeyURI splits a key URI into its region and keyset name. The region
// is the first path segment (^[a-z][a-z0-9-]{0,62}$, the root KMS's rule);
// the keyset is the rest and may contain '/' (lowercase segments of
// a-z 0-9 . _ -, the rule of the KMS's bundles).
func ParseKeyURI(uri string) (region, keyset string, err error) {
	rest, ok := strings.CutPrefix(uri, Scheme)
	if !ok {
		return "", "", fmt.Errorf("%w %q: want %s<region>/<keyset>", ErrInvalidURI, truncate(uri), Scheme)
	}
	region, keyset, ok = strings.Cut(rest, "/")
	if !ok {
		return "", "", fmt.Errorf("%w %q: no keyset; want %s<region>/<keyset>", ErrInvalidURI, truncate(uri), Scheme)
	}
	if err := validRegion(region); err != nil {
		return "", "", fmt.Errorf("%w %q: %v", ErrInvalidURI, truncate(uri), err)
	}
	if err := validKeyset(keyset); err != nil {
		return "", "", fmt.Errorf("%w %q: %v", ErrInvalidURI, truncate(uri), err)
	}
	return region, keyset, nil
}

// KeyURI returns the key URI of keyset in region. It does not validate the
// names; ParseKeyURI(KeyURI(r, k)) returns r and k for any valid pair.
func KeyURI(region, keyset string) string {
	return Scheme + region + "/" + keyset
}

// validRegion checks a region name with every tier's rule (internal/region),
// its message bounding the caller's string.
func validRegion(name string) error {
	if regionname.ValidName(name) != nil {
		return fmt.Errorf("region %q must match ^[a-z][a-z0-9-]{0,62}$", truncate(name))
	}
	return nil
}

// validKeyset checks a keyset name with the KMS's own rule.
func validKeyset(name string) error {
	if err := keysets.ValidName(name); err != nil {
		// keysets' message names its package; restate it as ours.
		return fmt.Errorf("keyset name %q: use lowercase segments of a-z 0-9 . _ - joined by /, e.g. payments/ledger", truncate(name))
	}
	return nil
}

// truncate bounds a caller-supplied string echoed in an error.
func truncate(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}
