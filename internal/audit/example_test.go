package audit_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cairnkms/cairn/internal/audit"
)

func Example() {
	dir, err := os.MkdirTemp("", "cairn-audit")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "audit.log")

	log, err := audit.Open(path, audit.Options{
		Sync: true,
		Now:  func() time.Time { return time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC) },
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx := context.Background()
	rec := audit.Record{
		RequestID: "req-1",
		Identity:  "spiffe://cairn.test/regionctl/admin",
		Operation: "cairn.rootkms.v1.RootKMS/RotateKeyset",
		Target:    audit.Target{Region: "us-east", Keyset: "payments"},
		Outcome:   audit.OutcomeAttempt,
	}
	// Fail closed: a mutating operation runs only once its attempt is on
	// record.
	if err := log.Write(ctx, rec); err != nil {
		fmt.Println("refusing the operation:", err)
		return
	}
	// ... perform the rotation ...
	rec.Outcome = audit.OutcomeOK
	rec.Target.KeyVersion = 8
	if err := log.Write(ctx, rec); err != nil {
		fmt.Println("operation done but not recorded:", err)
	}
	if err := log.Close(); err != nil {
		fmt.Println(err)
	}

	b, err := os.ReadFile(path)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Print(string(b))
	// Output:
	// {"time":"2026-01-02T03:04:05Z","prev":"0000000000000000000000000000000000000000000000000000000000000000","request_id":"req-1","identity":"spiffe://cairn.test/regionctl/admin","operation":"cairn.rootkms.v1.RootKMS/RotateKeyset","target":{"region":"us-east","keyset":"payments"},"outcome":"attempt"}
	// {"time":"2026-01-02T03:04:05Z","prev":"cd45f1941018d312e8e372d4bc6dbf5f4ad4b6845f6763fef12cb8ba66c019aa","request_id":"req-1","identity":"spiffe://cairn.test/regionctl/admin","operation":"cairn.rootkms.v1.RootKMS/RotateKeyset","target":{"region":"us-east","keyset":"payments","key_version":8},"outcome":"ok"}
}
