package chaos

import (
	"time"

	"github.com/cairnkms/cairn/tests/framework"
)

// What the SRE driver (driver_test.go) reports, in a file of its own so
// that the report (report.go) builds without the tests.

// DriverStats is what the SRE driver did, as regionctl and the cluster
// client answered it.
type DriverStats struct {
	// Rounds are the driver's rounds; RotateRuns and RotateFailed the
	// `rotate --due` runs and those that exited non-zero.
	Rounds, RotateRuns, RotateFailed int
	// Steps counts the lifecycle steps regionctl acknowledged ("done:"),
	// by kind: "add", "promote", "disable", "schedule-destroy", "destroy".
	Steps map[string]int
	// Pushes and PushFailed count `bundle build` + `bundle push` rounds
	// of one region and those that failed (retried in the next round).
	Pushes, PushFailed int
	// Failures counts the failed runs by command and the gRPC code or
	// first words of regionctl's last error line.
	Failures map[string]int
	// Samples holds the stderr of the first failed run of each reason.
	Samples map[string]string
	// Resolved counts the recorded region key writes of unknown outcome
	// that a later round sent again with their request ID and settled;
	// Resent the answered rotations sent again on purpose (a lost reply).
	Resolved, Resent int
}

// Lifecycle is what the record says happened to the keysets during the run.
type Lifecycle struct {
	// Rotations are versions added after the first; Promotions versions
	// made primary over another; Retirements versions disabled;
	// Destructions versions destroyed.
	Rotations, Promotions, Retirements, Destructions int
	// Retired is, by keyset and version, when the record took it out of
	// the decrypt set (disabled_at).
	Retired map[string]map[uint32]time.Time
}

// RootWrites is the verdict on the driver's recorded root KMS operations.
type RootWrites struct {
	Stats framework.HistoryStats
	// Linearizable is porcupine's verdict.
	Linearizable bool
	// Versions is, by region, the primary region key version every
	// replica serves at the end.
	Versions map[string]uint32
}
