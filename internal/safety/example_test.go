package safety_test

import (
	"errors"
	"fmt"
	"time"

	"github.com/cairnkms/cairn/internal/safety"
)

func ExampleCheckRetire() {
	now := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	k := safety.Keyset{
		Name:    "demo/notes",
		Regions: []string{"us-east"},
		TTL:     safety.WithTTL(nil, time.Hour, now.Add(-30*24*time.Hour)),
		Versions: []safety.Version{
			{KeyID: 3, State: safety.Enabled, PrimarySince: now.Add(-48 * time.Hour), SupersededAt: now.Add(-24 * time.Hour)},
		},
	}
	fleet := safety.Fleet{Servers: []safety.Server{{
		Region: "us-east", Name: "kms-2", Known: true,
		Keysets: map[string]safety.ServedKeyset{"demo/notes": {Versions: map[uint32]safety.ServedVersion{
			3: {Decrypts: true, LastUse: now.Add(-2 * time.Minute)},
		}}},
	}}}
	err := safety.CheckRetire(k, 3, fleet, safety.ScopeFleet, safety.DefaultParams(), now)
	fmt.Println(errors.Is(err, safety.ErrUnsafe))
	fmt.Println(err)
	// Output:
	// true
	// safety: keyset "demo/notes" version 3 cannot leave the decrypt set: region us-east server kms-2 used it at 2026-03-01T09:58:00Z (window 10m0s); earliest safe time 2026-03-01T10:08:00Z
}
