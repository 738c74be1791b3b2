package rollout_test

import (
	"testing"

	"github.com/cairnkms/cairn/regionctl/rollout"
)

// TestLastGoodIsNeverTheChange: a server may report that it already serves
// the rollout's own bundle: an apply repeated after a takeover (the earlier
// controller applied but could not store Applied) answers previous = the
// change, and so does a dry run repeated after a pause. The rollback target
// stays what the server served before the rollout first touched it; a
// rollback to the change would leave the bad change served while the
// record says rolled back.
func TestLastGoodIsNeverTheChange(t *testing.T) {
	p, err := rollout.NewPlan(change("us-east", "eu-west"), map[string][]string{"us-east": {"kms-1", "kms-2"}, "eu-west": {"kms-3"}},
		rollout.Options{Regions: []string{"us-east", "eu-west"}})
	if err != nil {
		t.Fatal(err)
	}
	old, ch := lastGoodRef("us-east"), newRef("us-east")
	tests := []struct {
		name   string
		events []rollout.Event
		want   rollout.BundleRef // the canary's LastGood, and the rollback's To
	}{
		{"apply repeated after a takeover", []rollout.Event{
			rollout.DryRunResult{Epoch: 1, Server: "kms-1", OK: true, Serving: old},
			rollout.Measured{Epoch: 1},
			rollout.TookOver{Epoch: 2, By: "ctl-2"},
			rollout.Applied{Epoch: 2, Server: "kms-1", Serial: bundleSerial, Previous: ch},
		}, old},
		{"dry run repeated after a pause, then the apply", []rollout.Event{
			rollout.DryRunResult{Epoch: 1, Server: "kms-1", OK: true, Serving: old},
			rollout.Measured{Epoch: 1},
			rollout.Pause{Epoch: 1, By: "bob", Why: "a look"},
			rollout.Resume{Epoch: 1, By: "bob"},
			rollout.DryRunResult{Epoch: 1, Server: "kms-1", OK: true, Serving: ch},
			rollout.Measured{Epoch: 1},
			rollout.Applied{Epoch: 1, Server: "kms-1", Serial: bundleSerial, Previous: ch},
		}, old},
		{"serving the change before the rollout: nothing to go back to", []rollout.Event{
			rollout.DryRunResult{Epoch: 1, Server: "kms-1", OK: true, Serving: ch},
			rollout.Measured{Epoch: 1},
			rollout.Applied{Epoch: 1, Server: "kms-1", Serial: bundleSerial, Previous: ch},
		}, rollout.BundleRef{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := rollout.NewRecord("r1", p, "ctl-1", 1, t0)
			step := func(ev rollout.Event) []rollout.Action {
				t.Helper()
				next, acts, err := rollout.Next(rec, ev, t0)
				if err != nil {
					t.Fatalf("Next(%T) = %v", ev, err)
				}
				rec = next
				return acts
			}
			step(rollout.Started{Epoch: 1})
			for _, ev := range tt.events {
				step(ev)
			}
			if got := rec.Servers["kms-1"].LastGood; got != tt.want {
				t.Errorf("LastGood = %v, want %v", got, tt.want)
			}
			var to []rollout.BundleRef
			for _, a := range step(rollout.RollbackRequested{Epoch: rec.Epoch, By: "bob", Why: "errors"}) {
				if rb, ok := a.(rollout.RollbackAction); ok {
					to = append(to, rb.To)
				}
			}
			if len(to) != 1 || to[0] != tt.want {
				t.Errorf("rollback to %v, want [%v]", to, tt.want)
			}
		})
	}
}
