// aigw console: copy buttons, delete confirmations, credential fields by kind.
document.addEventListener("click", (e) => {
  const b = e.target.closest("[data-copy]");
  if (!b) return;
  const input = document.getElementById(b.dataset.copy);
  input.select();
  const done = () => { b.textContent = "Copied"; };
  if (navigator.clipboard) navigator.clipboard.writeText(input.value).then(done, () => { document.execCommand("copy"); done(); });
  else { document.execCommand("copy"); done(); }
});
document.addEventListener("submit", (e) => {
  const msg = e.target.dataset.confirm;
  if (msg && !window.confirm(msg)) e.preventDefault();
});
function showCredential() {
  const sel = document.getElementById("credential");
  if (!sel) return;
  document.querySelectorAll("fieldset[data-credential]").forEach((f) => {
    const on = f.dataset.credential === sel.value;
    f.hidden = !on;
    f.querySelectorAll("input").forEach((i) => { i.disabled = !on; });
  });
}
document.addEventListener("change", (e) => { if (e.target.id === "credential") showCredential(); });
document.addEventListener("DOMContentLoaded", showCredential);
