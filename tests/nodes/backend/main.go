// The real-node tests' backend: an HTTP server that says which Pod answered and from
// where the request came, so a test sees which Pod served it and whether the client's
// source address survived. It takes agnhost's `netexec --http-port=N` arguments and
// serves agnhost's /hostname and /clientip, so the same Deployment runs it or agnhost
// (registry.k8s.io/e2e-test-images/agnhost, on clusters that can pull).
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"
)

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "netexec" {
		args = args[1:]
	}
	flags := flag.NewFlagSet("backend", flag.ExitOnError)
	port := flags.Int("http-port", 8080, "TCP port to serve HTTP on")
	flags.Parse(args)
	pod := os.Getenv("POD_NAME")
	if pod == "" {
		pod, _ = os.Hostname()
	}
	node := os.Getenv("NODE_NAME")
	mux := http.NewServeMux()
	mux.HandleFunc("/hostname", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, pod)
	})
	mux.HandleFunc("/clientip", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, r.RemoteAddr)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "pod=%s node=%s client=%s\n", pod, node, r.RemoteAddr)
	})
	server := &http.Server{
		Addr:              fmt.Sprintf(":%d", *port),
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       10 * time.Minute,
	}
	log.Fatal(server.ListenAndServe())
}
