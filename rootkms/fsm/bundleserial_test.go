package fsm_test

import (
	"bytes"
	"errors"
	"testing"

	"google.golang.org/protobuf/types/known/timestamppb"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

func recordSerial(region string, serial uint64, s int) *statev1.Command {
	return &statev1.Command{FormatVersion: fsm.FormatVersion, Time: timestamppb.New(at(s)),
		Op: &statev1.Command_RecordBundleSerial{RecordBundleSerial: &statev1.RecordBundleSerialCommand{Region: region, Serial: serial}}}
}

// TestRecordBundleSerial: a region's bundle serial floor only rises; a
// lower or repeated record is accepted and changes nothing; serial 0 and an
// unknown region are refused; the floor survives a snapshot.
func TestRecordBundleSerial(t *testing.T) {
	f := setupFSM(t)
	tests := []struct {
		name    string
		region  string
		serial  uint64
		wantErr error
		want    uint64 // eu's floor after
	}{
		{"first record", "eu", 2, nil, 2},
		{"higher", "eu", 5, nil, 5},
		{"lower does not lower it", "eu", 3, nil, 5},
		{"the same again", "eu", 5, nil, 5},
		{"serial 0", "eu", 0, fsm.ErrInvalidCommand, 5},
		{"unknown region", "ap", 9, fsm.ErrNoRegion, 5},
	}
	for i, tt := range tests {
		res := apply(t, f, recordSerial(tt.region, tt.serial, 100+i))
		if !errors.Is(res.Err, tt.wantErr) {
			t.Errorf("%s: Apply(record_bundle_serial %s %d).Err = %v, want %v", tt.name, tt.region, tt.serial, res.Err, tt.wantErr)
		}
		eu, _ := f.State().Region("eu")
		if eu.BundleSerialFloor != tt.want {
			t.Errorf("%s: eu's floor = %d, want %d", tt.name, eu.BundleSerialFloor, tt.want)
		}
	}
	if us, _ := f.State().Region("us"); us.BundleSerialFloor != 0 {
		t.Errorf("us's floor = %d, want 0 (records of eu do not touch it)", us.BundleSerialFloor)
	}

	b := rootkmstest.SnapshotBytes(t, f)
	dst := rootkmstest.NewFSM()
	if err := restoreBytes(dst, b); err != nil {
		t.Fatalf("Restore(Persist()) = %v", err)
	}
	if eu, _ := dst.State().Region("eu"); eu.BundleSerialFloor != 5 {
		t.Errorf("eu's floor after Restore = %d, want 5", eu.BundleSerialFloor)
	}
	if got := rootkmstest.SnapshotBytes(t, dst); !bytes.Equal(got, b) {
		t.Errorf("Persist() after Restore differs from the snapshot restored")
	}
}
